"""``qvl-train``: build the model, recipe, data and a HF ``Trainer`` from a validated :class:`TrainConfig`
(``config.py``), train, save through :class:`QvlSaveCallback`, and check the merged model on rank 0.

The library never prints: progress goes to an optional ``progress(step, max_steps, loss)`` callable.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from ..compat import dtype_kwarg
from ..errors import QvlError
from .config import FORCED_ARGS, TrainConfig, TrainConfigError, fail, load_train_config

__all__ = ["TrainConfig", "TrainConfigError", "TrainResult", "load_train_config", "run_training"]


@dataclass
class TrainResult:
    """What a run did; paths are filled on rank 0."""

    output_dir: Path
    recipe: str
    model: str
    base: Path | None = None
    adapter: Path | None = None
    pth: Path | None = None
    merged: Path | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)
    steps: int = 0
    train_seconds: float = 0.0
    trainable: int = 0
    tensors: int = 0
    max_abs_diff: float | None = None
    dump_unexpected: int | None = None
    world_size: int = 1
    is_main: bool = True

    @property
    def first_loss(self) -> float | None:
        return self.losses[0][1] if self.losses else None

    @property
    def last_loss(self) -> float | None:
        return self.losses[-1][1] if self.losses else None


# -- building ------------------------------------------------------------------------------------------


def _training_arguments(config: TrainConfig, output_dir: Path):
    from transformers import TrainingArguments

    kwargs = dict(
        per_device_train_batch_size=4, learning_rate=2e-4, logging_steps=1, report_to="none", save_strategy="no",
        disable_tqdm=True, seed=config.seed, dataloader_num_workers=0,
    )
    if not _has_accelerator():
        # CPU only: Trainer otherwise ignores torchrun's WORLD_SIZE (no gloo DDP) and warns about pinning.
        kwargs.update(use_cpu=True, dataloader_pin_memory=False)
    kwargs.update(config.training_args)
    kwargs.update(FORCED_ARGS)
    if config.deepspeed is not None:
        kwargs["deepspeed"] = dict(config.deepspeed)
    try:
        return TrainingArguments(output_dir=str(output_dir), **kwargs)
    except (TypeError, ValueError) as e:
        raise fail(config.source, f"training_args: {' '.join(str(e).split())}") from None


def _has_accelerator() -> bool:
    import torch

    if torch.cuda.is_available():
        return True
    acc = getattr(torch, "accelerator", None)
    return bool(acc is not None and acc.is_available())


def _import(path: str, what: str = "collator"):
    module, _, attr = path.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise TrainConfigError(f"{what} {path!r}: {e}") from None


def _zero_stage(config: TrainConfig) -> int:
    return int((config.deepspeed or {}).get("zero_optimization", {}).get("stage", 0)) if config.deepspeed else 0


def init_deepspeed_comm(source: str = "deepspeed") -> None:
    """Start DeepSpeed's process group before TrainingArguments exist (gloo without an accelerator).

    TrainingArguments checks ``train_batch_size`` against the world size it sees when created; with
    ``use_cpu`` accelerate would never start the group itself, so every rank would think it is alone.
    Outside a launcher this is a 1-process group on localhost.
    """
    try:
        import deepspeed
    except ImportError:
        raise TrainConfigError(f"{source}: the deepspeed section needs DeepSpeed: pip install 'qvl-plugin[deepspeed]'") from None
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    if "RANK" not in os.environ:  # not launched by torchrun/accelerate/deepspeed: one process
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    deepspeed.init_distributed(dist_backend=None if _has_accelerator() else "gloo", auto_mpi_discovery=False)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reload_adapter(base: Path | None, adapter: Path | None):
    """The saved adapter on a fresh, unpartitioned copy of the base (None when either is missing)."""
    if base is None or adapter is None:
        return None
    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(base), **dtype_kwarg(torch.float32), local_files_only=True,
                                                        trust_remote_code=False)
    return PeftModel.from_pretrained(model, str(adapter))


def _load_model(config: TrainConfig):
    """(model, processor, base_dir_or_None) for a user model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    from .tiny import load_processor

    kwargs = {"dtype": "auto", **config.model_kwargs}
    if "torch_dtype" in kwargs:  # the pre-4.56 name, as a YAML may spell it
        kwargs["dtype"] = kwargs.pop("torch_dtype")
    if isinstance(kwargs.get("dtype"), str) and kwargs["dtype"] != "auto":
        kwargs["dtype"] = getattr(torch, kwargs["dtype"])
    kwargs.update(dtype_kwarg(kwargs.pop("dtype")))
    # A model's own code runs only when the YAML says so; an explicit False also stops transformers' prompt.
    trust = kwargs.get("trust_remote_code") is True
    kwargs["trust_remote_code"] = trust
    try:
        if config.recipe.family == "qwen-vl":
            if not trust:
                raise TrainConfigError(
                    f"{config.source}: Qwen-VL v1 ({config.model}) is remote code, which qvl-train runs only when told: "
                    "set model_kwargs: {trust_remote_code: true} if you trust that model's *.py files")
            model = AutoModelForCausalLM.from_pretrained(config.model, **kwargs)
            processor = AutoTokenizer.from_pretrained(config.model, trust_remote_code=True)
        else:
            model = AutoModelForImageTextToText.from_pretrained(config.model, **kwargs)
            processor = load_processor(config.model, trust_remote_code=trust)
    except OSError as e:
        raise TrainConfigError(f"{config.source}: model {config.model!r}: {' '.join(str(e).split())}") from None
    base = Path(config.model)
    if not base.is_dir():
        try:
            from huggingface_hub import snapshot_download

            base = Path(snapshot_download(config.model, local_files_only=True))
        except Exception:  # noqa: BLE001 - only needed for 'merged'; reported below if so
            base = None
    return model, processor, base


class _Progress:
    """Collects the logged training losses; forwards them to the caller's progress function."""

    def __new__(cls, progress: Callable[[int, int, float], None] | None):
        from transformers import TrainerCallback

        class Recorder(TrainerCallback):
            def __init__(self) -> None:
                self.losses: list[tuple[int, float]] = []

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs and state.is_world_process_zero:
                    loss = float(logs["loss"])
                    self.losses.append((state.global_step, loss))
                    if progress is not None:
                        progress(state.global_step, state.max_steps, loss)

        return Recorder()


def run_training(config: TrainConfig | str | Path, *, max_steps: int | None = None, output_dir: str | Path | None = None,
                 progress: Callable[[int, int, float], None] | None = None) -> TrainResult:
    """Build the model, recipe, data and ``Trainer`` from ``config``; train; save the recipe's formats through
    :class:`QvlSaveCallback`; on rank 0 check the merged model against the trained adapter.

    Run under ``torchrun``/``accelerate launch`` for several processes: every rank runs this function.
    """
    if not isinstance(config, TrainConfig):
        config = load_train_config(config)
    import torch
    from transformers import PrinterCallback, Trainer, set_seed

    from .callback import QvlSaveCallback
    from .data import JsonCaptions, QwenVLCollator, SyntheticCaptions
    from .gather import dist_rank
    from .saving import _commit, _tmp_sibling
    from .tiny import build_tiny_model, load_processor, save_base
    from ..recipes import apply_recipe

    if config.recipe.family == "qwen-vl" and config.collator is None:
        raise fail(config.source, "Qwen-VL v1 has no processor: give collator: 'pkg.module:factory' (factory(tokenizer) "
                                   "-> collator), or train with your own script and QvlSaveCallback")
    out = Path(output_dir) if output_dir is not None else config.output_dir
    args_over = dict(config.training_args)
    if max_steps is not None:
        args_over["max_steps"] = int(max_steps)
    config = dataclasses.replace(config, training_args=args_over)
    if config.deepspeed is not None:
        init_deepspeed_comm(config.source)
    # The tiny model is built before TrainingArguments: under ZeRO-3 those open zero.Init for every later
    # construction, which the direct constructor cannot run under; DeepSpeed partitions it at initialize.
    model = build_tiny_model(config.seed) if config.embedded else None
    args = _training_arguments(config, out)
    _ = args.device  # sets up accelerate's state (and the process group under torchrun) before rank checks
    distributed, rank = dist_rank()
    set_seed(config.seed)
    zero3 = _zero_stage(config) == 3

    if config.embedded:
        processor = load_processor()
        base = out / "base"
        if rank == 0:  # the untrained model as a plain HF dir: what a merge/audit starts from
            tmp = _tmp_sibling(base)
            save_base(model, processor, tmp)
            _commit(tmp, base)
        model_label = "embedded tiny Qwen2-VL"
    else:
        model, processor, base = _load_model(config)  # under ZeRO-3: into partitions (zero.Init)
        model_label = config.model
    if "merged" in config.recipe.save and base is None:
        raise TrainConfigError(f"{config.source}: 'merged' needs the base model as a local dir; {config.model!r} "
                               "is not one (download it first or drop 'merged' from save)")

    peft_model = apply_recipe(model, config.recipe)
    if args.gradient_checkpointing:
        peft_model.enable_input_require_grads()  # frozen embeddings would otherwise cut the graph
    if base is not None:
        peft_model.peft_config["default"].base_model_name_or_path = str(base.resolve()) if config.embedded else (
            config.model if not Path(config.model).is_dir() else str(Path(config.model).resolve()))
    dataset = JsonCaptions(config.dataset) if config.dataset else SyntheticCaptions(config.synthetic_size, seed=config.seed)
    collator = _import(config.collator)(processor) if config.collator else QwenVLCollator(processor, prompt=config.prompt)

    saver = QvlSaveCallback(config.recipe, base_path=base, final_dir=out)
    recorder = _Progress(progress)
    extra = [_import(path, "callbacks")() for path in config.callbacks]
    trainer = Trainer(model=peft_model, args=args, train_dataset=dataset, data_collator=collator,
                      callbacks=[saver, recorder, *extra])
    trainer.remove_callback(PrinterCallback)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    if zero3:  # training is over: later from_pretrained calls (verification) must not open zero.Init
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()

    final = saver.final
    result = TrainResult(
        output_dir=out, recipe=config.recipe.name, model=model_label, base=base,
        adapter=final.adapter if final else None, pth=final.pth if final else None,
        merged=final.merged if final else None, losses=recorder.losses, steps=trainer.state.global_step,
        train_seconds=seconds,
        trainable=sum(getattr(p, "ds_numel", p.numel()) for p in peft_model.parameters() if p.requires_grad),
        tensors=final.tensors if final else 0, world_size=args.world_size, is_main=rank == 0,
    )
    verify = config.embedded if config.verify is None else config.verify
    if rank == 0 and verify:
        batch = collator([dataset[i] for i in range(min(2, len(dataset)))])
        # Under ZeRO-3 the trained model is partitioned (a forward on one rank would wait for the others):
        # check against the saved adapter on a fresh copy of the base instead.
        reference = _reload_adapter(base, result.adapter) if zero3 else peft_model
        if reference is not None and result.pth is not None:
            dump = torch.load(result.pth, weights_only=True, mmap=True, map_location="cpu")
            result.dump_unexpected = len(reference.load_state_dict(dump, strict=False).unexpected_keys)
        if reference is not None and result.merged is not None:
            result.max_abs_diff = _logit_diff(reference, result.merged, batch)
    if result.last_loss is not None and not math.isfinite(result.last_loss):
        raise QvlError(f"training diverged: last loss {result.last_loss}")
    return result


def _logit_diff(peft_model, merged_dir: Path, batch: Mapping[str, Any]) -> float:
    """Max |logits(merged) - logits(adapter)| on one batch, fp32 on CPU."""
    import torch
    from transformers import AutoModelForImageTextToText

    peft_model.eval()
    device = next(peft_model.parameters()).device
    with torch.no_grad():
        ref = peft_model(**{k: v.to(device) for k, v in batch.items() if k != "labels"}).logits.float().cpu()
        merged = AutoModelForImageTextToText.from_pretrained(str(merged_dir), **dtype_kwarg(torch.float32),
                                                              local_files_only=True, trust_remote_code=False)
        merged.eval()
        got = merged(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
    del merged
    return float((got - ref).abs().max())
