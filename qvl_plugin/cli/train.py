"""``qvl-train RECIPE.yaml``: train with a recipe from a YAML file (see ``qvl_plugin.hosts.runner``).

Multi-process: ``torchrun --nproc_per_node N -m qvl_plugin.cli.train RECIPE.yaml`` (or ``accelerate launch``).
"""

from __future__ import annotations

import os

import click

from .guard import QvlCommand, fail

__all__ = ["main"]


@click.command(cls=QvlCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--max-steps", type=click.IntRange(min=1), help="Override training_args.max_steps.")
@click.option("--output-dir", type=click.Path(file_okay=False), help="Override output_dir.")
@click.option("-q", "--quiet", is_flag=True, help="Only the summary.")
@click.version_option(package_name="qvl-plugin")
def main(config: str, max_steps: int | None, output_dir: str | None, quiet: bool) -> None:
    """Train a LoRA + modules_to_save recipe from CONFIG (a qvl-train YAML file).

    Without `model:` and `dataset:` in the file it trains the embedded tiny Qwen2-VL on synthetic
    image–caption pairs, on CPU, offline; then writes base/, adapter/, adapter.pth and merged/ into
    output_dir and checks that the merged model reproduces the adapter's logits.
    """
    _run(config, max_steps, output_dir, quiet)


def _run(path: str, max_steps: int | None, output_dir: str | None, quiet: bool) -> None:
    import time

    start = time.perf_counter()
    from ..hosts.config import load_train_config
    from ..hosts.runner import run_training

    config = load_train_config(path)  # before transformers is imported: sets HF_HUB_OFFLINE for the tiny model
    _quiet_libraries()
    rank0 = os.environ.get("RANK", "0") == "0"
    say = (lambda s: click.echo(s)) if rank0 else (lambda s: None)
    steps = max_steps or config.training_args.get("max_steps")
    say(f"qvl-train: {config.recipe.name} on {'the embedded tiny Qwen2-VL (offline, CPU ok)' if config.embedded else config.model}"
        f", {'synthetic captions' if config.dataset is None else config.dataset}"
        f"{f', {steps} steps' if steps else ''} -> {output_dir or config.output_dir}")
    every = max(1, (steps or 10) // 12)

    def progress(step: int, total: int, loss: float) -> None:
        if not quiet and (step == 1 or step % every == 0 or step == total):
            say(f"  step {step:>4}/{total}  loss {loss:.4f}")

    result = run_training(config, max_steps=max_steps, output_dir=output_dir, progress=progress)
    if not result.is_main:
        return
    first, last = result.first_loss, result.last_loss
    say(f"trained {result.steps} steps in {result.train_seconds:.1f}s on {result.world_size} process(es); "
        f"{result.trainable:,} trainable parameters in {result.tensors} tensors")
    if first is not None:
        say(f"loss first {first:.4f} -> last {last:.4f}")
    for label, p in (("base", result.base), ("adapter", result.adapter), ("dump", result.pth), ("merged", result.merged)):
        if p is not None:
            say(f"  {label:<8} {p}")
    if result.dump_unexpected is not None:
        say(f"dump loads into the PEFT model with {result.dump_unexpected} unexpected keys")
    if result.max_abs_diff is not None:
        ok = result.max_abs_diff < 1e-3
        say(f"merged vs adapter logits: max abs diff {result.max_abs_diff:.2e} ({'ok' if ok else 'MISMATCH'})")
        if not ok:
            fail(f"the merged model does not reproduce the adapter (max abs logit diff {result.max_abs_diff:.3g})")
    say(f"done in {time.perf_counter() - start:.1f}s")


def _quiet_libraries() -> None:
    """Our own progress lines instead of library progress bars and deprecation chatter."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    # the recipe unties a tied embedding/head on purpose (tied: untie) and the merge is checked below
    warnings.filterwarnings("ignore", message=".*ensure_weight_tying.*")
    warnings.filterwarnings("ignore", message=".*pin_memory.*")


if __name__ == "__main__":
    main()
