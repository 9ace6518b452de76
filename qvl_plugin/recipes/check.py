"""Dry run: what a recipe will train and save on a model of any size, before a GPU is spent.

Transformers families are built from ``config.json`` on the meta device (no weights read; seconds even
for 72B) and wrapped for real, so the numbers are PEFT's own. Qwen-VL v1 has no transformers class: its
report is computed from the checkpoint's key names and shapes with the same resolution rules.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..units import human_bytes
from ..errors import QvlError, UsageError
from ..layouts import GROUPS, Layout, detect_layout, get_layout
from .apply import ModelIndex, PatternMatch, TrainableRow, apply_recipe, lora_numel, plan_recipe, trainable_report
from .schema import Recipe, RecipeError

__all__ = ["CheckReport", "check_recipe", "build_meta_model", "keys_index", "read_model_config", "SUGGEST_TOKENS_BYTES"]

SUGGEST_TOKENS_BYTES = 256 * 2**20  # whole embedding+head above this: suggest trainable token rows
_LORA_BYTES = 4  # PEFT keeps LoRA/trainable-token parameters in fp32 (autocast_adapter_dtype)


@dataclass
class CheckReport:
    recipe: Recipe
    model: str
    family: str
    method: str  # "meta" (model built on the meta device) | "keys" (checkpoint key names and shapes)
    dtype: str
    tied: bool
    matches: list[PatternMatch]
    rows: list[TrainableRow]
    adapter_bytes: int  # the PEFT adapter_model.safetensors tensors
    pth_bytes: int  # a dump of the trainable parameters, each once
    lora_config: dict[str, Any] = field(default_factory=dict)
    suggestions: list[str] = field(default_factory=list)

    @property
    def trainable(self) -> int:
        return sum(r.trainable for r in self.rows)

    @property
    def total(self) -> int:
        return sum(r.total for r in self.rows)

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe.name,
            "model": self.model,
            "family": self.family,
            "method": self.method,
            "dtype": self.dtype,
            "tied": self.tied,
            "patterns": [{"kind": m.kind, "pattern": m.pattern, "count": len(m.modules), "modules": list(m.modules)} for m in self.matches],
            "groups": [dict(asdict(r), percent=round(r.percent, 4)) for r in self.rows],
            "trainable": self.trainable,
            "total": self.total,
            "adapter_bytes": self.adapter_bytes,
            "pth_bytes": self.pth_bytes,
            "lora_config": self.lora_config,
            "suggestions": list(self.suggestions),
        }


def read_model_config(model_dir: Path, needed_by: str = "recipes check") -> dict:
    """``model_dir/config.json``, read safely; a missing one names who needed it."""
    from ..ckpt.safety import read_json  # regular file, size cap: config.json may come from a stranger

    path = model_dir / "config.json"
    if not path.exists():
        raise RecipeError(f"{model_dir}: no config.json ({needed_by} needs the model directory)")
    try:
        return read_json(path)
    except QvlError as e:
        raise RecipeError(str(e)) from None


def _dtype(config: Any) -> torch.dtype:
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value.removeprefix("torch."), None)
    return value if isinstance(value, torch.dtype) else torch.bfloat16


def build_meta_model(model_dir: str | Path):
    """The model of ``model_dir/config.json`` on the meta device: every module and shape, no storage."""
    import transformers
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    read_model_config(model_dir)
    try:
        config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)  # never run or ask to run a model's code
    except Exception as e:
        raise RecipeError(f"{model_dir}/config.json: transformers cannot read it ({type(e).__name__}: {e})") from None
    from ..compat import dtype_kwarg  # dtype= (transformers >= 4.56) or torch_dtype=

    dtype = dtype_kwarg(_dtype(config))
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        try:
            return transformers.AutoModelForImageTextToText.from_config(config, **dtype, trust_remote_code=False)
        except ValueError:
            pass
        for arch in getattr(config, "architectures", None) or ():
            cls = getattr(transformers, arch, None)
            if cls is not None:
                return cls._from_config(config, **dtype)
    raise RecipeError(f"{model_dir}: no transformers class for {getattr(config, 'architectures', None) or config.model_type}")


def check_recipe(recipe: Recipe | str, model_dir: str | Path, *, method: str = "auto") -> CheckReport:
    """What ``recipe`` trains and saves on the model in ``model_dir`` (config.json; weights only for v1).

    ``method``: "meta" builds the model from config.json on the meta device; "keys" reads the checkpoint's
    tensor names and shapes (the only way for Qwen-VL v1); "auto" picks.
    """
    from .registry import get_recipe

    recipe = get_recipe(recipe)
    model_dir = Path(model_dir)
    config = read_model_config(model_dir)
    layout = detect_layout(config=config)
    if method == "auto":
        method = "keys" if layout.name == "qwen-vl" else "meta"
    if method == "meta":
        return _check_meta(recipe, model_dir)
    if method == "keys":
        return _check_keys(recipe, model_dir, config)
    raise UsageError(f"unknown check method {method!r} (auto, meta or keys)")


def _check_meta(recipe: Recipe, model_dir: Path) -> CheckReport:
    from peft import get_peft_model_state_dict

    model = build_meta_model(model_dir)
    plan = plan_recipe(model, recipe)
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        peft_model = apply_recipe(model, recipe)
        state = get_peft_model_state_dict(peft_model)
    rows = trainable_report(peft_model, plan.layout)
    adapter = sum(t.numel() * t.element_size() for t in state.values())
    seen: set[int] = set()
    pth = 0
    for _, p in peft_model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            pth += p.numel() * p.element_size()
    whole = sum(t.numel() * t.element_size() for k, t in state.items() if _edge_copy(plan, k))
    hidden = _hidden(plan.index, plan)
    return _finish(recipe, model_dir, plan, "meta", str(model.dtype).removeprefix("torch."), rows, adapter, pth, whole, hidden)


def _edge_copy(plan, key: str) -> bool:
    """Is this adapter key a whole embedding/head copy (modules_to_save)?"""
    name = key.removeprefix("base_model.model.")
    return any(name.startswith(m + ".") and plan.layout.group(m) in ("embedding", "head") for m in plan.modules_to_save)


def _hidden(index: ModelIndex, plan) -> int:
    emb = plan.layout.embedding
    shape = index.weight(emb) if emb else None
    return shape[0][1] if shape and len(shape[0]) == 2 else 0


def keys_index(model_dir: Path, layout: Layout, config: dict) -> ModelIndex:
    """Module names and shapes from the checkpoint's own keys: Qwen-VL v1 has no transformers class."""
    from ..ckpt.view import open_checkpoint

    try:
        ckpt = open_checkpoint(model_dir, format="merged", layout=layout)
    except QvlError as e:
        raise RecipeError(f"{model_dir}: for {layout.title} (no transformers class) qvl reads the checkpoint's key names "
                          f"and shapes, and could not: {e}") from None
    with ckpt:
        shapes = {e.target: (e.shape, e.dtype) for e in ckpt.entries}
    if not shapes:
        raise RecipeError(f"{model_dir}: no weight files; {layout.title} has no transformers class, so its checkpoint is needed")
    return ModelIndex.from_shapes(shapes, layout, config)


def _check_keys(recipe: Recipe, model_dir: Path, config: dict) -> CheckReport:
    layout = get_layout(recipe.family)
    index = keys_index(model_dir, layout, config)
    plan = plan_recipe(index, recipe)
    r = recipe
    acc: dict[str, list[int]] = {g: [0, 0, 0, 0] for g in GROUPS}
    for key, (shape, _) in index.params.items():
        acc[layout.group(key.rpartition(".")[0])][1] += _numel(shape)

    def add(module: str, numel: int, nbytes: int, tensors: int) -> None:
        row = acc[layout.group(module)]
        row[0] += numel
        row[2] += tensors
        row[3] += nbytes

    adapter = whole = 0
    for m in plan.lora_modules:
        n = lora_numel(index.weight(m)[0], r.r, r.use_dora)
        add(m, n, n * _LORA_BYTES, 3 if r.use_dora else 2)
        adapter += n * _LORA_BYTES
    shared = plan.ensure_weight_tying

    def own(m: str) -> list[tuple[tuple[int, ...], torch.dtype]]:
        found = [(s, d) for k, (s, d) in index.params.items() if k.startswith(m + ".")]
        if not found and m in index.shared:  # tied file without the head tensor
            found = [index.weight(m)]
        return found

    for m in plan.modules_to_save:
        copy = own(m)
        numel, nbytes = sum(_numel(s) for s, _ in copy), sum(_numel(s) * d.itemsize for s, d in copy)
        edge = layout.group(m) in ("embedding", "head")
        adapter += nbytes
        whole += nbytes if edge else 0
        if shared and layout.group(m) == "head":
            continue  # ensure_weight_tying: the head shares the embedding's copy; the file still holds a clone
        add(m, numel, nbytes, len(copy))
    if shared and not any(layout.group(m) == "head" for m in plan.modules_to_save):
        shape, dt = index.weight(layout.embedding)
        adapter += _numel(shape) * dt.itemsize
        whole += _numel(shape) * dt.itemsize
    skip_head = index.tied and r.tied == "tie"
    for m, ids in plan.token_rows.items():
        if skip_head and layout.group(m) == "head":
            continue  # PEFT ties the head's rows to the embedding's
        n = len(ids) * index.weight(m)[0][1]
        add(m, n, n * _LORA_BYTES, 1)
        adapter += n * _LORA_BYTES
    pth = sum(v[3] for v in acc.values())
    rows = [TrainableRow(g, *v) for g, v in acc.items() if v[0] or v[1]]
    dtypes = {d for _, d in index.params.values()}
    dtype = str(max(dtypes, key=lambda d: sum(1 for _, x in index.params.values() if x == d))).removeprefix("torch.")
    return _finish(recipe, model_dir, plan, "keys", dtype, rows, adapter, pth, whole, _hidden(index, plan))


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


_CONFIG_FIELDS = ("r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "target_modules", "target_parameters", "modules_to_save",
                  "trainable_token_indices", "ensure_weight_tying", "task_type")


def _finish(recipe, model_dir, plan, method, dtype, rows, adapter, pth, whole, hidden) -> CheckReport:
    suggestions = []
    if whole >= SUGGEST_TOKENS_BYTES:
        per_100 = 100 * hidden * _LORA_BYTES * (1 if plan.index.tied else 2)
        suggestions.append(
            f"the embedding and lm_head are trained whole: {human_bytes(whole)} of the {human_bytes(adapter)} adapter. "
            f"If the point is new tokens, train only their rows: trainable_tokens: [ids] (recipe "
            f"{recipe.family}/lora-new-tokens), about {human_bytes(per_100)} per 100 tokens."
        )
    raw = plan.lora_config().to_dict()
    config = {k: (sorted(raw[k]) if isinstance(raw[k], set) else raw[k]) for k in _CONFIG_FIELDS if k in raw}
    config = json.loads(json.dumps(config, default=str))
    return CheckReport(recipe, str(model_dir), plan.layout.name, method, dtype, plan.index.tied, list(plan.matches),
                       rows, adapter, pth, lora_config=config, suggestions=suggestions)
