"""``qvl-ckpt recover``: a thin click layer over ``qvl_plugin.ckpt.recover``."""

from __future__ import annotations

import click

from .render import console, print_json

__all__ = ["recover"]


@click.command()
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=str))
@click.option("-o", "--out", required=True, type=click.Path(path_type=str), help="Output adapter dir or .pth file.")
@click.option("--to", "to", type=click.Choice(["peft", "pth"]), default="peft", show_default=True, help="Output format.")
@click.option("--adapter-config", type=click.Path(exists=True, dir_okay=False), help="The run's adapter_config.json (default: the one next to global_stepN/).")
@click.option("--lora-alpha", type=float, help="LoRA alpha when no adapter_config.json exists (never guessed).")
@click.option("--base", type=click.Path(exists=True, path_type=str), help="Base model dir (recorded as base_model_name_or_path).")
@click.option("--force", is_flag=True, help="Replace an existing OUT (atomically).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def recover(src, out, to, adapter_config, lora_alpha, base, force, as_json) -> None:
    """Rebuild the trained tensors (LoRA, modules_to_save, token rows) of a DeepSpeed ZeRO run from its
    global_stepN/ shards and write a working adapter (or a .pth dump).

    SRC: a run dir (newest checkpoint-N/), a checkpoint-N/ dir or a global_stepN/ dir. For runs whose saved
    adapter holds empty (ZeRO-3) tensors. No code from the files runs (weights_only loading).
    """
    from ..ckpt.recover import recover as recover_api  # torch: only when the command runs (--help stays light)

    report = recover_api(src, out, to=to, adapter_config=adapter_config, lora_alpha=lora_alpha, base=base, force=force)
    if as_json:
        print_json(report.to_dict())
        return
    console.print(f"recovered [bold]{report.tensors}[/bold] tensors ({report.numel:,} values) from ZeRO-{report.zero_stage} "
                  f"shards of {report.world_size} rank(s) in [bold]{report.deepspeed_dir}[/bold] -> [bold green]{report.out}[/bold green]")
    if report.adapter_config is not None and to == "peft":
        console.print(f"adapter config: {report.adapter_config}")
