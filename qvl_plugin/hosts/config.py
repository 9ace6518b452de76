"""The ``qvl-train`` YAML file: its keys, their validation, and the one-line errors for a file that cannot work.

    recipe: qwen2-vl/lora-embed-head     # a registered recipe name, or a recipe mapping
    overrides: {r: 8, save: [adapter, pth, merged]}
    model: Qwen/Qwen2-VL-2B-Instruct     # local HF dir or hub id; absent = the embedded tiny Qwen2-VL
    model_kwargs: {dtype: bfloat16}      # extra from_pretrained kwargs
    dataset: data/train.jsonl            # local JSON/JSONL of {image, text[, prompt]}; absent = synthetic
    synthetic_size: 512                  # size of the synthetic set (no dataset)
    prompt: Describe the image.
    collator: my_pkg.data:make_collator  # optional factory(processor) -> collator
    callbacks: [my_pkg.cb:make_callback] # optional factories() -> TrainerCallback, added to the Trainer
    deepspeed: ds_zero3.json             # optional DeepSpeed config: a JSON path or an inline mapping
    training_args: {max_steps: 40, learning_rate: 2.0e-4}   # TrainingArguments kwargs
    output_dir: out/run                  # relative to the working directory
    seed: 0
    verify: true                         # merged model vs adapter logits (default: on for the tiny model)

Everything here runs before a model is built, so a bad file fails in seconds (see ``runner`` for the run).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..errors import QvlError

__all__ = ["TrainConfig", "TrainConfigError", "load_train_config", "KEYS", "DEFAULT_OUTPUT", "FORCED_ARGS"]

KEYS = (
    "recipe", "overrides", "model", "model_kwargs", "dataset", "synthetic_size", "prompt", "collator",
    "training_args", "output_dir", "seed", "verify", "callbacks", "deepspeed",
)
DEFAULT_OUTPUT = "out/qvl-train"
FORCED_ARGS = {"remove_unused_columns": False}  # the collator needs the image column


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
    callbacks: tuple[str, ...] = ()
    deepspeed: Mapping[str, Any] | None = None
    source: str = "<mapping>"

    @property
    def embedded(self) -> bool:
        """True when the embedded tiny model is used (no ``model:``)."""
        return self.model is None


# -- validation ----------------------------------------------------------------------------------------


def fail(source: str, message: str) -> TrainConfigError:
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
            raise fail(label, "no such file") from None
        except OSError as e:
            raise fail(label, f"cannot read ({e.strerror or e})") from None
        except yaml.YAMLError as e:
            raise fail(label, f"not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, Mapping):
        raise fail(label, f"expected a mapping of {', '.join(KEYS)}; got {type(data).__name__}")
    unknown = [k for k in data if k not in KEYS]
    if unknown:
        raise fail(label, f"unknown key {unknown[0]!r}{_hint(unknown[0], KEYS)}; known: {', '.join(KEYS)}")

    def typed(key: str, kinds, what: str, default=None):
        value = data.get(key, default)
        if value is not None and (not isinstance(value, kinds) or isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,))):
            raise fail(label, f"{key} must be {what}, got {type(value).__name__} {value!r}")
        return value

    model = typed("model", str, "a local model directory or hub id")
    if model is not None and not model.strip():
        raise fail(label, "model is empty (omit it for the embedded tiny model)")
    if model is None:
        # The embedded default never needs the network: make sure nothing tries.
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
    model_kwargs = dict(typed("model_kwargs", Mapping, "a mapping of from_pretrained kwargs") or {})
    dataset = typed("dataset", str, "the path of a local JSON/JSONL file of {image, text} records")
    if dataset is not None:
        p = Path(dataset)
        if not p.is_file():
            raise fail(label, f"dataset {dataset!r}: no such file (a local .json/.jsonl of {{image, text}} records)")
        if p.suffix not in (".json", ".jsonl"):
            raise fail(label, f"dataset {dataset!r}: expected a .json or .jsonl file")
    size = typed("synthetic_size", int, "a positive integer", 512)
    if size < 1:
        raise fail(label, f"synthetic_size must be >= 1, got {size}")
    prompt = typed("prompt", str, "a string", "Describe the image.")
    collator = typed("collator", str, "an import path like 'pkg.module:factory'")
    if collator is not None and ":" not in collator:
        raise fail(label, f"collator {collator!r} must look like 'pkg.module:factory'")
    output_dir = typed("output_dir", str, "a directory path", DEFAULT_OUTPUT)
    seed = typed("seed", int, "an integer", 0)
    verify = typed("verify", bool, "true or false")
    callbacks = typed("callbacks", list, "a list of import paths like 'pkg.module:factory'") or []
    for cb in callbacks:
        if not isinstance(cb, str) or ":" not in cb:
            raise fail(label, f"callbacks: {cb!r} must look like 'pkg.module:factory'")
    deepspeed = _deepspeed_config(label, data.get("deepspeed"))

    # recipe
    from ..recipes import Recipe, RecipeError, get_recipe

    spec = data.get("recipe")
    if spec is None:
        raise fail(label, "missing 'recipe' (a registered recipe name such as qwen2-vl/lora-embed-head, or a mapping)")
    recipe_overrides = typed("overrides", Mapping, "a mapping of recipe fields") or {}
    recipe_overrides = {**recipe_overrides, **(overrides or {})}
    try:
        if isinstance(spec, str):
            recipe = get_recipe(spec)
        elif isinstance(spec, Mapping):
            recipe = Recipe.from_dict(spec)
        else:
            raise fail(label, f"recipe must be a name or a mapping, got {type(spec).__name__}")
        if recipe_overrides:
            recipe = recipe.with_overrides(**recipe_overrides)
    except RecipeError as e:
        raise fail(label, str(e)) from None
    if model is None and recipe.family != "qwen2-vl":
        raise fail(label, f"the embedded tiny model is a Qwen2-VL but recipe {recipe.name} is for {recipe.family}; "
                           "give model: <dir or hub id>")

    # TrainingArguments
    args = typed("training_args", Mapping, "a mapping of TrainingArguments kwargs") or {}
    args = {**args, **(training_args or {})}
    from transformers import TrainingArguments

    known = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    for key in args:
        if key not in known:
            raise fail(label, f"training_args: unknown TrainingArguments field {key!r}{_hint(key, known)}")
    if "output_dir" in args:
        raise fail(label, "training_args.output_dir: use the top-level output_dir")
    if "deepspeed" in args:
        raise fail(label, "training_args.deepspeed: use the top-level deepspeed (its process group is set up first)")
    for key, value in FORCED_ARGS.items():
        if key in args and args[key] != value:
            raise fail(label, f"training_args.{key} must stay {value!r} (the collator needs the image column)")
    return TrainConfig(
        recipe=recipe, model=model, model_kwargs=model_kwargs, dataset=Path(dataset) if dataset else None,
        synthetic_size=size, prompt=prompt, collator=collator, training_args=args, output_dir=Path(output_dir),
        seed=seed, verify=verify, callbacks=tuple(callbacks), deepspeed=deepspeed, source=label,
    )


def _deepspeed_config(label: str, value: Any) -> dict[str, Any] | None:
    """The ``deepspeed:`` section as a dict: an inline mapping, or a JSON file (relative to the working
    directory, like every path in the file). Read here so that a bad file fails before any model is built."""
    import json

    if value is None:
        return None
    if isinstance(value, Mapping):
        cfg = dict(value)
    elif isinstance(value, str) and value.strip():
        path = Path(value)
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise fail(label, f"deepspeed {value!r}: no such file (a DeepSpeed JSON config, or an inline mapping)") from None
        except (OSError, UnicodeDecodeError) as e:
            raise fail(label, f"deepspeed {value!r}: cannot read ({getattr(e, 'strerror', None) or e})") from None
        except json.JSONDecodeError as e:
            raise fail(label, f"deepspeed {value!r}: not valid JSON ({e})") from None
        if not isinstance(cfg, Mapping):
            raise fail(label, f"deepspeed {value!r}: expected a JSON object, got {type(cfg).__name__}")
    else:
        raise fail(label, f"deepspeed must be a JSON file path or a mapping, got {type(value).__name__} {value!r}")
    zero = cfg.get("zero_optimization", {})
    if not isinstance(zero, Mapping) or zero.get("stage", 0) not in (0, 1, 2, 3):
        raise fail(label, f"deepspeed: zero_optimization.stage must be 0, 1, 2 or 3, got {zero!r}")
    return cfg
