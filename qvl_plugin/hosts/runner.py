"""``qvl-train``: a thin runner that builds a HF ``Trainer`` from a YAML file.

    recipe: qwen2-vl/lora-embed-head     # a registered recipe name, or a recipe mapping
    overrides: {r: 8, save: [adapter, pth, merged]}
    model: Qwen/Qwen2-VL-2B-Instruct     # local HF dir or hub id; absent = the embedded tiny Qwen2-VL
    model_kwargs: {dtype: bfloat16}      # extra from_pretrained kwargs
    dataset: data/train.jsonl            # local JSON/JSONL of {image, text[, prompt]}; absent = synthetic
    synthetic_size: 512                  # size of the synthetic set (no dataset)
    prompt: Describe the image.
    collator: my_pkg.data:make_collator  # optional factory(processor) -> collator
    training_args: {max_steps: 40, learning_rate: 2.0e-4}   # TrainingArguments kwargs
    output_dir: out/run                  # relative to the working directory
    seed: 0
    verify: true                         # merged model vs adapter logits (default: on for the tiny model)

The library never prints: progress goes to an optional ``progress(step, max_steps, loss)`` callable.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from ..errors import QvlError

__all__ = ["TrainConfig", "TrainConfigError", "TrainResult", "load_train_config", "run_training", "KEYS"]

KEYS = (
    "recipe", "overrides", "model", "model_kwargs", "dataset", "synthetic_size", "prompt", "collator",
    "training_args", "output_dir", "seed", "verify",
)
DEFAULT_OUTPUT = "out/qvl-train"
_FORCED_ARGS = {"remove_unused_columns": False}  # the collator needs the image column


class TrainConfigError(QvlError):
    """A qvl-train YAML file that cannot work (unknown key, wrong type, bad recipe, bad TrainingArguments)."""


@dataclass(frozen=True)
class TrainConfig:
    """A validated qvl-train file."""

    recipe: Any  # qvl_plugin.recipes.Recipe
    model: str | None = None
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    dataset: Path | None = None
    synthetic_size: int = 512
    prompt: str = "Describe the image."
    collator: str | None = None
    training_args: Mapping[str, Any] = field(default_factory=dict)
    output_dir: Path = Path(DEFAULT_OUTPUT)
    seed: int = 0
    verify: bool | None = None
    source: str = "<mapping>"

    @property
    def embedded(self) -> bool:
        """True when the embedded tiny model is used (no ``model:``)."""
        return self.model is None


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


# -- validation ----------------------------------------------------------------------------------------


def _fail(source: str, message: str) -> TrainConfigError:
    return TrainConfigError(f"{source}: {message}")


def _hint(word: str, known) -> str:
    hits = difflib.get_close_matches(str(word), list(known), n=1, cutoff=0.6)
    return f" (did you mean {hits[0]!r}?)" if hits else ""


def load_train_config(source: str | Path | Mapping[str, Any], *, overrides: Mapping[str, Any] | None = None,
                      training_args: Mapping[str, Any] | None = None) -> TrainConfig:
    """Read and validate a qvl-train YAML file (or an already-parsed mapping).

    ``overrides`` / ``training_args`` are merged over the file's own (e.g. fewer steps in tests).
    Raises :class:`TrainConfigError` with a one-line message.
    """
    import yaml

    if isinstance(source, Mapping):
        data, label = dict(source), "<mapping>"
    else:
        path = Path(source)
        label = str(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise _fail(label, "no such file") from None
        except OSError as e:
            raise _fail(label, f"cannot read ({e.strerror or e})") from None
        except yaml.YAMLError as e:
            raise _fail(label, f"not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, Mapping):
        raise _fail(label, f"expected a mapping of {', '.join(KEYS)}; got {type(data).__name__}")
    unknown = [k for k in data if k not in KEYS]
    if unknown:
        raise _fail(label, f"unknown key {unknown[0]!r}{_hint(unknown[0], KEYS)}; known: {', '.join(KEYS)}")

    def typed(key: str, kinds, what: str, default=None):
        value = data.get(key, default)
        if value is not None and (not isinstance(value, kinds) or isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,))):
            raise _fail(label, f"{key} must be {what}, got {type(value).__name__} {value!r}")
        return value

    model = typed("model", str, "a local model directory or hub id")
    if model is not None and not model.strip():
        raise _fail(label, "model is empty (omit it for the embedded tiny model)")
    if model is None:
        # The embedded default never needs the network: make sure nothing tries.
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
    model_kwargs = dict(typed("model_kwargs", Mapping, "a mapping of from_pretrained kwargs") or {})
    dataset = typed("dataset", str, "the path of a local JSON/JSONL file of {image, text} records")
    if dataset is not None:
        p = Path(dataset)
        if not p.is_file():
            raise _fail(label, f"dataset {dataset!r}: no such file (a local .json/.jsonl of {{image, text}} records)")
        if p.suffix not in (".json", ".jsonl"):
            raise _fail(label, f"dataset {dataset!r}: expected a .json or .jsonl file")
    size = typed("synthetic_size", int, "a positive integer", 512)
    if size < 1:
        raise _fail(label, f"synthetic_size must be >= 1, got {size}")
    prompt = typed("prompt", str, "a string", "Describe the image.")
    collator = typed("collator", str, "an import path like 'pkg.module:factory'")
    if collator is not None and ":" not in collator:
        raise _fail(label, f"collator {collator!r} must look like 'pkg.module:factory'")
    output_dir = typed("output_dir", str, "a directory path", DEFAULT_OUTPUT)
    seed = typed("seed", int, "an integer", 0)
    verify = typed("verify", bool, "true or false")

    # recipe
    from ..recipes import Recipe, RecipeError, get_recipe

    spec = data.get("recipe")
    if spec is None:
        raise _fail(label, "missing 'recipe' (a registered recipe name such as qwen2-vl/lora-embed-head, or a mapping)")
    recipe_overrides = typed("overrides", Mapping, "a mapping of recipe fields") or {}
    recipe_overrides = {**recipe_overrides, **(overrides or {})}
    try:
        if isinstance(spec, str):
            recipe = get_recipe(spec)
        elif isinstance(spec, Mapping):
            recipe = Recipe.from_dict(spec)
        else:
            raise _fail(label, f"recipe must be a name or a mapping, got {type(spec).__name__}")
        if recipe_overrides:
            recipe = recipe.with_overrides(**recipe_overrides)
    except RecipeError as e:
        raise _fail(label, str(e)) from None
    if model is None and recipe.family != "qwen2-vl":
        raise _fail(label, f"the embedded tiny model is a Qwen2-VL but recipe {recipe.name} is for {recipe.family}; "
                           "give model: <dir or hub id>")

    # TrainingArguments
    args = typed("training_args", Mapping, "a mapping of TrainingArguments kwargs") or {}
    args = {**args, **(training_args or {})}
    from transformers import TrainingArguments

    known = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    for key in args:
        if key not in known:
            raise _fail(label, f"training_args: unknown TrainingArguments field {key!r}{_hint(key, known)}")
    if "output_dir" in args:
        raise _fail(label, "training_args.output_dir: use the top-level output_dir")
    for key, value in _FORCED_ARGS.items():
        if key in args and args[key] != value:
            raise _fail(label, f"training_args.{key} must stay {value!r} (the collator needs the image column)")
    return TrainConfig(
        recipe=recipe, model=model, model_kwargs=model_kwargs, dataset=Path(dataset) if dataset else None,
        synthetic_size=size, prompt=prompt, collator=collator, training_args=args, output_dir=Path(output_dir),
        seed=seed, verify=verify, source=label,
    )


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
    kwargs.update(_FORCED_ARGS)
    try:
        return TrainingArguments(output_dir=str(output_dir), **kwargs)
    except (TypeError, ValueError) as e:
        raise _fail(config.source, f"training_args: {' '.join(str(e).split())}") from None


def _has_accelerator() -> bool:
    import torch

    if torch.cuda.is_available():
        return True
    acc = getattr(torch, "accelerator", None)
    return bool(acc is not None and acc.is_available())


def _import(path: str):
    module, _, attr = path.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise TrainConfigError(f"collator {path!r}: {e}") from None


def _load_model(config: TrainConfig):
    """(model, processor, base_dir_or_None) for a user model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    from .tiny import load_processor

    kwargs = {"dtype": "auto", **config.model_kwargs}
    if isinstance(kwargs.get("dtype"), str) and kwargs["dtype"] != "auto":
        kwargs["dtype"] = getattr(torch, kwargs["dtype"])
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
    from .saving import _commit, _dist, _tmp_sibling
    from .tiny import build_tiny_model, load_processor, save_base
    from ..recipes import apply_recipe

    if config.recipe.family == "qwen-vl" and config.collator is None:
        raise _fail(config.source, "Qwen-VL v1 has no processor: give collator: 'pkg.module:factory' (factory(tokenizer) "
                                   "-> collator), or train with your own script and QvlSaveCallback")
    out = Path(output_dir) if output_dir is not None else config.output_dir
    args_over = dict(config.training_args)
    if max_steps is not None:
        args_over["max_steps"] = int(max_steps)
    config = dataclasses.replace(config, training_args=args_over)
    args = _training_arguments(config, out)
    _ = args.device  # sets up accelerate's state (and the process group under torchrun) before rank checks
    distributed, rank = _dist()
    set_seed(config.seed)

    if config.embedded:
        model = build_tiny_model(config.seed)
        processor = load_processor()
        base = out / "base"
        if rank == 0:  # the untrained model as a plain HF dir: what a merge/audit starts from
            tmp = _tmp_sibling(base)
            save_base(model, processor, tmp)
            _commit(tmp, base)
        model_label = "embedded tiny Qwen2-VL"
    else:
        model, processor, base = _load_model(config)
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
    trainer = Trainer(model=peft_model, args=args, train_dataset=dataset, data_collator=collator,
                      callbacks=[saver, recorder])
    trainer.remove_callback(PrinterCallback)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start

    final = saver.final
    result = TrainResult(
        output_dir=out, recipe=config.recipe.name, model=model_label, base=base,
        adapter=final.adapter if final else None, pth=final.pth if final else None,
        merged=final.merged if final else None, losses=recorder.losses, steps=trainer.state.global_step,
        train_seconds=seconds, trainable=sum(p.numel() for p in peft_model.parameters() if p.requires_grad),
        tensors=final.tensors if final else 0, world_size=args.world_size, is_main=rank == 0,
    )
    verify = config.embedded if config.verify is None else config.verify
    if rank == 0 and verify:
        batch = collator([dataset[i] for i in range(min(2, len(dataset)))])
        if result.pth is not None:
            dump = torch.load(result.pth, weights_only=True, mmap=True, map_location="cpu")
            result.dump_unexpected = len(peft_model.load_state_dict(dump, strict=False).unexpected_keys)
        if result.merged is not None:
            result.max_abs_diff = _logit_diff(peft_model, result.merged, batch)
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
        merged = AutoModelForImageTextToText.from_pretrained(str(merged_dir), dtype=torch.float32, local_files_only=True,
                                                              trust_remote_code=False)
        merged.eval()
        got = merged(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
    del merged
    return float((got - ref).abs().max())
