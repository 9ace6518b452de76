"""Applying a recipe: resolve it against a model's module names, then wrap the model with PEFT.

Resolution (``plan_recipe``) is a pure function over module names and shapes, so the same checks run on
a real model, a meta-device model of any size, or a checkpoint's key list (Qwen-VL v1). Every pattern
must match, and only where it belongs (language targets in the language model, vision targets in the
vision tower), before anything is wrapped: a typo is an error with the closest module names, never an
adapter that silently trains less.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..compat import version_at_least
from ..layouts import GROUPS, Layout, detect_layout, get_layout
from .schema import FAMILIES, Recipe, RecipeError, close, family_modules

__all__ = [
    "ModelIndex",
    "PatternMatch",
    "RecipePlan",
    "TrainableRow",
    "plan_recipe",
    "apply_recipe",
    "trainable_report",
    "split_param",
    "lora_numel",
]

_LORA_TYPES: tuple[type, ...] = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)
try:  # GPT-2 style Conv1D, which PEFT also wraps
    from transformers.pytorch_utils import Conv1D

    _LORA_TYPES += (Conv1D,)
except ImportError:  # pragma: no cover
    pass

_NUM = re.compile(r"\.\d+(?=\.|$)")


@dataclass(frozen=True)
class ModelIndex:
    """What plan_recipe needs to know about a model: module names, shapes, tying. No tensors."""

    modules: tuple[str, ...]
    lora_capable: frozenset[str]
    params: Mapping[str, tuple[tuple[int, ...], torch.dtype]]  # "module.param" -> (shape, dtype)
    tied: bool
    family: str | None = None
    causal_lm: bool = False
    shared: Mapping[str, str] = field(default_factory=dict)  # module -> module whose weight it reuses (tied head)

    @classmethod
    def from_model(cls, model: nn.Module) -> "ModelIndex":
        modules = tuple(n for n, _ in model.named_modules() if n)
        capable = frozenset(n for n, m in model.named_modules() if n and isinstance(m, _LORA_TYPES))
        params = {n: (tuple(p.shape), p.dtype) for n, p in model.named_parameters(remove_duplicate=False)}
        family = None
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            family = detect_layout(config=config.to_dict()).name
        return cls(modules, capable, params, _is_tied(model), family, hasattr(model, "prepare_inputs_for_generation"))

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple[tuple[int, ...], torch.dtype]], layout: Layout,
                    config: Mapping[str, Any] | None = None) -> "ModelIndex":
        """From a checkpoint's tensor names (any layout of the family) and shapes."""
        params: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for key, meta in shapes.items():
            module, _, pname = key.rpartition(".")
            params[f"{layout.canonical(module)}.{pname}" if module else key] = meta
        modules: set[str] = set()
        for key in params:
            parts = key.split(".")[:-1]
            modules.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        capable = frozenset(k[: -len(".weight")] for k, (shape, _) in params.items() if k.endswith(".weight") and len(shape) >= 2)
        config = dict(config or {})
        text = config.get("text_config") or {}
        tie = config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
        head = f"{layout.head}.weight" if layout.head else None
        tied = bool(tie) or (head is not None and head not in params and f"{layout.embedding}.weight" in params)
        shared = {}
        if tied and head is not None and head not in params and f"{layout.embedding}.weight" in params:
            shared = {layout.head: layout.embedding}  # tied files omit the head: the module still exists
            modules.add(layout.head)
            capable |= {layout.head}
        return cls(tuple(sorted(modules)), capable, params, tied, layout.name, shared=shared)

    def weight(self, module: str) -> tuple[tuple[int, ...], torch.dtype] | None:
        return self.params.get(f"{self.shared.get(module, module)}.weight")


def _is_tied(model: nn.Module) -> bool:
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    try:
        emb, head = (get_in() if get_in else None), (get_out() if get_out else None)
    except (NotImplementedError, AttributeError):
        return False
    w_in, w_out = getattr(emb, "weight", None), getattr(head, "weight", None)
    return w_in is not None and w_in is w_out


@dataclass(frozen=True)
class PatternMatch:
    kind: str  # "target" | "vision_target" | "module" | "tokens"
    pattern: str  # the regex, or the logical name for train_modules
    modules: tuple[str, ...]


@dataclass(frozen=True)
class RecipePlan:
    """A recipe resolved against one model: the exact modules PEFT will touch."""

    recipe: Recipe
    layout: Layout
    index: ModelIndex = field(repr=False)
    matches: tuple[PatternMatch, ...]
    lora_modules: tuple[str, ...]
    modules_to_save: tuple[str, ...]
    token_rows: Mapping[str, tuple[int, ...]]
    untie: bool  # mark the model config untied before wrapping
    ensure_weight_tying: bool
    lora_params: tuple[str, ...] = ()  # "module.param" of every raw parameter LoRA wraps (target_parameters)

    @property
    def target_regex(self) -> str:
        pats = (*self.recipe.targets, *self.recipe.vision_targets)
        return pats[0] if len(pats) == 1 else "|".join(f"(?:{p})" for p in pats)

    @property
    def shared_token_rows(self) -> bool:
        """tied='tie' on a tied model with token rows on both embedding and head: one set of rows for both."""
        groups = {self.layout.group(m) for m in self.token_rows}
        return self.index.tied and self.recipe.tied == "tie" and {"embedding", "head"} <= groups

    def lora_config(self):
        from peft import LoraConfig

        kwargs: dict[str, Any] = dict(
            r=self.recipe.r,
            lora_alpha=self.recipe.lora_alpha,
            lora_dropout=self.recipe.lora_dropout,
            use_rslora=self.recipe.use_rslora,
            use_dora=self.recipe.use_dora,
            target_modules=self.target_regex if (self.recipe.targets or self.recipe.vision_targets) else [],
            modules_to_save=list(self.modules_to_save) or None,
            bias="none",
            task_type="CAUSAL_LM" if self.index.causal_lm else None,
        )
        if self.recipe.target_parameters:
            kwargs["target_parameters"] = list(self.recipe.target_parameters)
        if self.token_rows:
            rows = {m: list(ids) for m, ids in self.token_rows.items()}
            if self.shared_token_rows and not version_at_least("peft", 0, 21):
                # PEFT < 0.21 (measured on 0.15.2; 0.21.2 shares them) gives a listed tied head rows of its own (they drift apart from the embedding's
                # while the config stays tied); listed alone, the embedding's rows are shared with the tied head
                # (PEFT >= 0.15), which is what tied='tie' means.
                rows = {m: ids for m, ids in rows.items() if self.layout.group(m) != "head"}
            kwargs["trainable_token_indices"] = rows
        if self.ensure_weight_tying:
            if "ensure_weight_tying" not in {f.name for f in dataclasses.fields(LoraConfig)}:
                raise RecipeError(f"recipe {self.recipe.name}: tied='tie' needs peft >= 0.18 (ensure_weight_tying)")
            kwargs["ensure_weight_tying"] = True
        return LoraConfig(**kwargs)


def _shape_of(name: str) -> str:
    return _NUM.sub(".N", name)


def _no_match(what: str, pattern: str, names: Sequence[str]) -> RecipeError:
    shapes = sorted({_shape_of(n) for n in names})
    plain = re.sub(r"\\d[+*]?|\[0-9\][+*]?", "N", pattern).replace("\\.", ".")
    plain = re.sub(r"[\\^$()?]", "", plain)
    hint = close(plain, shapes, n=3)
    return RecipeError(f"{what} {pattern!r} matches no module of this model (patterns fullmatch canonical module paths){hint}")


def _match(pattern: str, names: Sequence[str]) -> tuple[str, ...]:
    rx = re.compile(pattern)
    return tuple(n for n in names if rx.fullmatch(n))


def plan_recipe(model: nn.Module | ModelIndex, recipe: Recipe | str) -> RecipePlan:
    """Resolve ``recipe`` against ``model`` (or a ModelIndex) and check it fits, without changing anything."""
    from .registry import get_recipe

    recipe = get_recipe(recipe)
    index = model if isinstance(model, ModelIndex) else ModelIndex.from_model(model)
    label = f"recipe {recipe.name}"
    if index.family in FAMILIES and index.family != recipe.family:
        raise RecipeError(f"{label} is for {recipe.family} but the model is {index.family}")
    layout = get_layout(recipe.family)
    names = index.modules
    frozen = set(recipe.freeze)
    matches: list[PatternMatch] = []

    lora: dict[str, None] = {}
    for kind, what, allowed in (("target", "targets", ("language",)), ("vision_target", "vision_targets", ("vision", "merger"))):
        for pattern in getattr(recipe, what):
            hit = _match(pattern, names)
            if not hit:
                raise _no_match(f"{label}: {what} pattern", pattern, names)
            bad = [m for m in hit if m not in index.lora_capable]
            if bad:
                raise RecipeError(f"{label}: {what} pattern {pattern!r} matches modules LoRA cannot wrap (not Linear/Conv/Embedding): {', '.join(bad[:3])}; match the layers inside them")
            wrong = [m for m in hit if layout.group(m) not in allowed]
            if wrong:
                raise RecipeError(f"{label}: {what} pattern {pattern!r} matches {len(wrong)} module(s) outside the {' / '.join(allowed)} ({', '.join(wrong[:3])}); anchor it to the right part of the model")
            cold = [m for m in hit if layout.group(m) in frozen]
            if cold:
                raise RecipeError(f"{label}: {what} pattern {pattern!r} matches frozen {layout.group(cold[0])} modules ({', '.join(cold[:3])})")
            matches.append(PatternMatch(kind, pattern, hit))
            lora.update(dict.fromkeys(hit))

    params: dict[str, None] = {}
    for name in recipe.target_parameters:
        hit = tuple(k for k in index.params if k == name or k.endswith("." + name))  # PEFT's own matching
        if not hit:
            raise RecipeError(f"{label}: target_parameters {name!r} matches no parameter of this model")
        cold = [k for k in hit if layout.group(k.rpartition(".")[0]) in frozen]
        if cold:
            raise RecipeError(f"{label}: target_parameters {name!r} matches frozen {layout.group(cold[0].rpartition('.')[0])} parameters ({cold[0]})")
        both = [k for k in hit if k.rpartition(".")[0] in lora]
        if both:
            raise RecipeError(f"{label}: {both[0]} is targeted by target_parameters and its module by targets; choose one")
        matches.append(PatternMatch("parameter", name, hit))
        params.update(dict.fromkeys(hit))

    logical = family_modules(recipe.family)
    save: dict[str, None] = {}
    for name in recipe.train_modules:
        hit = _match(logical[name], names)
        if not hit:
            raise _no_match(f"{label}: train_modules {name!r} =", logical[name], names)
        cold = [m for m in hit if layout.group(m) in frozen]
        if cold:
            raise RecipeError(f"{label}: train_modules {name!r} is in the frozen {layout.group(cold[0])} ({cold[0]})")
        matches.append(PatternMatch("module", name, hit))
        save.update(dict.fromkeys(hit))
    inside = [(m, s) for m in lora for s in save if m.startswith(s + ".")]
    if inside:
        raise RecipeError(f"{label}: LoRA target {inside[0][0]} lies inside {inside[0][1]}, which is trained whole; drop one of them")

    rows: dict[str, tuple[int, ...]] = {}
    tokens = recipe.trainable_tokens
    if tokens is not None and not tokens:
        raise RecipeError(f"{label} needs trainable_tokens: the ids of the tokens to train (e.g. with_overrides(trainable_tokens=[151646, 151647]))")
    if tokens:
        spec = dict(tokens) if isinstance(tokens, Mapping) else {"embed": tokens, "lm_head": tokens}
        for key, ids in spec.items():
            pattern = logical.get(key, key)
            hit = _match(pattern, names)
            if not hit:
                raise _no_match(f"{label}: trainable_tokens {key!r} =", pattern, names)
            for m in hit:
                shape = index.weight(m)
                if shape is None or len(shape[0]) != 2:
                    raise RecipeError(f"{label}: trainable_tokens {key!r} matches {m}, which has no 2-D weight to take rows from")
                if max(ids) >= shape[0][0]:
                    raise RecipeError(f"{label}: trainable_tokens {key!r}: token id {max(ids)} >= {shape[0][0]} rows of {m}")
                if m in save or m in lora:
                    raise RecipeError(f"{label}: {m} is both trained by rows (trainable_tokens) and whole/LoRA; choose one")
                if layout.group(m) in frozen:
                    raise RecipeError(f"{label}: trainable_tokens {key!r} is in the frozen {layout.group(m)} ({m})")
                rows[m] = tuple(ids)
            matches.append(PatternMatch("tokens", key, hit))

    edges = [m for m in (*save, *rows) if layout.group(m) in ("embedding", "head")]
    untie = ensure = False
    if index.tied and edges:
        if recipe.tied == "error":
            raise RecipeError(f"{label} trains {', '.join(edges)} but this model ties embedding and lm_head (tied='error'); choose tied: untie or tie")
        tied_rows = {ids for m, ids in rows.items() if layout.group(m) in ("embedding", "head")}
        if recipe.tied == "tie" and len(tied_rows) > 1:
            raise RecipeError(f"{label}: tied='tie' shares one matrix between embedding and lm_head, so their trainable_tokens must be the same ids (or use tied: untie)")
        untie = recipe.tied == "untie"
        ensure = recipe.tied == "tie" and any(m in save for m in edges)
    return RecipePlan(recipe, layout, index, tuple(matches), tuple(lora), tuple(save), rows, untie, ensure, tuple(params))


def _mark_untied(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    for cfg in (config, getattr(config, "text_config", None)):
        if cfg is not None and hasattr(cfg, "tie_word_embeddings"):
            cfg.tie_word_embeddings = False


def apply_recipe(model: nn.Module, recipe: Recipe | str, *, adapter_name: str = "default"):
    """Wrap ``model`` with PEFT as ``recipe`` says; exactly the recipe's parameters end up trainable.

    With ``tied='untie'`` on a tied model whose embedding or head is trained, ``model.config`` (and its
    ``text_config``) is marked ``tie_word_embeddings=False`` so saved and merged models stay untied.
    """
    from peft import get_peft_model

    plan = plan_recipe(model, recipe)
    if plan.untie:
        _mark_untied(model)
    peft_model = get_peft_model(model, plan.lora_config(), adapter_name=adapter_name)
    _verify(peft_model, plan)
    return peft_model


_MARK = re.compile(r"\.(lora_[A-Za-z_]+|modules_to_save|original_module|token_adapter|base_layer)(?=\.|$)")


def split_param(name: str) -> tuple[str, str]:
    """PEFT parameter name -> (base module path, role).

    role is ``lora_A``/``lora_B``/``lora_embedding_A``/... , ``modules_to_save``, ``trainable_tokens``,
    or ``""`` for a base parameter (also under ``base_layer``/``original_module``).
    """
    name = name.removeprefix("base_model.model.")
    m = _MARK.search(name)
    if m is None:
        return name.rpartition(".")[0], ""
    rest = name[m.start():]
    if "trainable_tokens_delta" in rest:
        return name[: m.start()], "trainable_tokens"
    if ".modules_to_save." in rest:
        return name[: m.start()], "modules_to_save"
    lora = re.search(r"\.(lora_[A-Za-z_]+)(?=\.|$)", rest)
    return name[: m.start()], lora.group(1) if lora else ""


def _verify(peft_model, plan: RecipePlan) -> None:
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper, TrainableTokensWrapper

    holders = {k.rpartition(".")[0] for k in plan.lora_params}
    expected = set(plan.lora_modules) | set(plan.modules_to_save) | set(plan.token_rows) | holders
    unwrap = lambda m: re.sub(r"(\.base_layer)+$", "", m)  # noqa: E731  nested ParamWrappers
    stray = [n for n, p in peft_model.named_parameters() if p.requires_grad and unwrap(split_param(n)[0]) not in expected]
    base = peft_model.get_base_model()
    missing = [m for mods, cls in ((plan.lora_modules + tuple(sorted(holders)), LoraLayer), (plan.modules_to_save, ModulesToSaveWrapper),
                                   (tuple(plan.token_rows), TrainableTokensWrapper))
               for m in mods if not isinstance(base.get_submodule(m), cls)]
    if stray or missing:
        raise RecipeError(f"recipe {plan.recipe.name}: PEFT did not wrap what the recipe says "
                          f"(unexpected trainable: {stray[:3]}, not wrapped: {missing[:3]})")
    if plan.shared_token_rows:
        deltas = {n: id(p) for n, p in peft_model.named_parameters(remove_duplicate=False)
                  if "trainable_tokens_delta" in n and split_param(n)[0] in plan.token_rows}
        if len(set(deltas.values())) > 1:
            import peft

            raise RecipeError(f"recipe {plan.recipe.name}: tied='tie' but PEFT {peft.__version__} gave "
                              f"{', '.join(sorted({split_param(n)[0] for n in deltas}))} separate token rows on this "
                              "tied model; use tied: untie (or another PEFT version)")


@dataclass(frozen=True)
class TrainableRow:
    group: str
    trainable: int  # trainable parameters (elements)
    total: int  # base parameters of the group
    tensors: int  # trainable tensors
    nbytes: int  # bytes of the trainable tensors

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else (100.0 if self.trainable else 0.0)


def trainable_report(peft_model, layout: Layout | None = None) -> list[TrainableRow]:
    """Trainable vs. total parameters per layout group (embedding, head, language, vision, merger, other)."""
    if layout is None:
        base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
        config = getattr(base, "config", None)
        layout = detect_layout(modules=(n for n, _ in base.named_modules()), config=config.to_dict() if hasattr(config, "to_dict") else None)
    acc = {g: [0, 0, 0, 0] for g in GROUPS}
    for name, p in peft_model.named_parameters():
        module, role = split_param(name)
        row = acc[layout.group(module)]
        if not role:
            row[1] += p.numel()
        if p.requires_grad:
            row[0] += p.numel()
            row[2] += 1
            row[3] += p.numel() * p.element_size()
    return [TrainableRow(g, *v) for g, v in acc.items() if v[0] or v[1]]


def lora_numel(shape: tuple[int, ...], r: int, dora: bool = False) -> int:
    """Elements of lora_A + lora_B (+ DoRA magnitude) for a base weight of ``shape`` (out, in, *kernel)."""
    out, rest = shape[0], math.prod(shape[1:])
    return r * rest + out * r + (out if dora else 0)
