"""The Recipe type: one validated description of a LoRA + modules_to_save fine-tuning setup.

A recipe is data (a frozen dataclass), checked when it is built, so a typo in a field name, a family, a
logical module name or a policy fails at once with a one-line message instead of training the wrong
thing. Everything model-specific (which module paths exist) is checked later, by ``apply_recipe``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from ..errors import QvlError

__all__ = [
    "Recipe",
    "RecipeError",
    "FAMILIES",
    "SAVE_FORMATS",
    "TIED_POLICIES",
    "FREEZABLE",
    "family_modules",
    "family_default_targets",
    "load_recipe_file",
]

FAMILIES = ("qwen-vl", "qwen2-vl", "qwen2.5-vl", "qwen3-vl", "qwen3-vl-moe")
SAVE_FORMATS = ("adapter", "pth", "merged")
TIED_POLICIES = ("untie", "tie", "error")
FREEZABLE = ("vision", "merger", "language")

_NAME = re.compile(r"[A-Za-z0-9][\w.+/-]*")
# A leading wildcard turns a path pattern into a suffix pattern: `.*mlp\.gate_proj` also hits Qwen2.5-VL's
# vision MLP. Targets are written from the root of the module tree instead.
_LEADING_WILDCARD = re.compile(r"^\^?(\(\?:|\()*\.[*+?{]")


class RecipeError(QvlError):
    """A recipe is invalid, cannot be found or loaded, or does not fit the model it is applied to."""


def close(word: str, candidates, n: int = 3) -> str:
    """' (did you mean: a, b?)' or '' — for error messages."""
    hits = difflib.get_close_matches(word, list(candidates), n=n, cutoff=0.5)
    return f" (did you mean: {', '.join(hits)}?)" if hits else ""


@cache
def _family_json(family: str) -> dict:
    for f in resources.files("qvl_plugin.layouts").iterdir():
        if f.name.endswith(".json"):
            data = json.loads(f.read_text())
            if data.get("name") == family:
                return data
    raise RecipeError(f"no layout file for family {family!r}")


def family_modules(family: str) -> dict[str, str]:
    """Logical module name -> canonical module path regex (fullmatch), from the family's layout JSON."""
    return dict(_family_json(family).get("modules") or {})


def family_default_targets(family: str) -> tuple[str, ...]:
    """The family's default LoRA target patterns (all language-model linear layers)."""
    return tuple(_family_json(family).get("default_targets") or ())


def _strs(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise RecipeError(f"{what} must be a list of strings, got {value!r}")
    return tuple(value)


def _ids(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise RecipeError(f"{what} must be a list of token ids (integers), got {value!r}")
    if any(v < 0 for v in value):
        raise RecipeError(f"{what}: token ids must be >= 0, got {[v for v in value if v < 0]}")
    if len(set(value)) != len(value):
        raise RecipeError(f"{what}: duplicate token ids {sorted({v for v in value if value.count(v) > 1})}")
    return tuple(value)


@dataclass(frozen=True)
class Recipe:
    """A LoRA + fully-trained-modules setup for one Qwen-VL family.

    ``targets`` / ``vision_targets`` are regexes that must fully match canonical (in-memory) module
    paths, e.g. ``model\\.language_model\\.layers\\.\\d+\\.self_attn\\.(q|k|v|o)_proj``; ``None`` means the
    family's default targets. ``train_modules`` are logical names (``embed``, ``lm_head``, ``merger``,
    ``norm``, ``vision``) trained whole (PEFT modules_to_save). ``trainable_tokens`` trains only some rows:
    a list means those rows of the embedding *and* the head (what a new token needs), a dict maps a
    logical name or module path to its rows; an empty list marks a template whose ids must be given
    (``with_overrides(trainable_tokens=[...])``) before it can be applied. ``freeze`` lists components
    that must end up with no trainable parameter (enforced). ``tied`` says what to do when the model
    ties embedding and head and the recipe trains either: ``untie`` (independent copies, config marked
    untied), ``tie`` (one shared copy, PEFT ``ensure_weight_tying``), ``error``.
    """

    name: str
    family: str
    description: str = ""
    r: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.05
    use_rslora: bool = False
    use_dora: bool = False
    targets: tuple[str, ...] | None = None
    vision_targets: tuple[str, ...] = ()
    train_modules: tuple[str, ...] = ()
    trainable_tokens: tuple[int, ...] | Mapping[str, tuple[int, ...]] | None = field(default=None, hash=False)
    freeze: tuple[str, ...] = ("vision", "merger")
    tied: str = "untie"
    save: tuple[str, ...] = ("adapter",)
    target_parameters: tuple[str, ...] = ()
    """Raw parameters to LoRA (PEFT ``target_parameters``, suffix names like ``mlp.experts.gate_up_proj``):
    fused MoE experts. The router (``mlp.gate.weight``) is trained only when listed here."""

    def __post_init__(self) -> None:
        problems: list[str] = []
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass normalisation)
        try:
            self._validate(set_, problems)
        except RecipeError as e:
            problems.append(str(e))
        if problems:
            label = self.name if isinstance(self.name, str) and self.name else "<unnamed>"
            raise RecipeError(f"recipe {label}: " + "; ".join(problems))

    def _validate(self, set_, problems: list[str]) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            problems.append(f"name must be a non-empty identifier like 'qwen2-vl/lora', got {self.name!r}")
        if self.family not in FAMILIES:
            raise RecipeError(f"unknown family {self.family!r}{close(str(self.family), FAMILIES)}; known: {', '.join(FAMILIES)}")
        if not isinstance(self.description, str) or "\n" in self.description:
            problems.append("description must be one line of text")
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            problems.append(f"r must be an integer >= 1, got {self.r!r}")
        if not isinstance(self.lora_alpha, (int, float)) or isinstance(self.lora_alpha, bool) or self.lora_alpha <= 0:
            problems.append(f"lora_alpha must be a number > 0, got {self.lora_alpha!r}")
        if not isinstance(self.lora_dropout, (int, float)) or isinstance(self.lora_dropout, bool) or not 0 <= self.lora_dropout < 1:
            problems.append(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        for flag in ("use_rslora", "use_dora"):
            if not isinstance(getattr(self, flag), bool):
                problems.append(f"{flag} must be true or false, got {getattr(self, flag)!r}")

        targets = family_default_targets(self.family) if self.targets is None else _strs(self.targets, "targets")
        set_("targets", targets)
        set_("vision_targets", _strs(self.vision_targets, "vision_targets"))
        for what in ("targets", "vision_targets"):
            for pattern in getattr(self, what):
                try:
                    re.compile(pattern)
                except re.error as e:
                    problems.append(f"{what}: invalid regex {pattern!r} ({e})")
                    continue
                if not pattern or _LEADING_WILDCARD.match(pattern):
                    problems.append(
                        f"{what}: {pattern!r} is a suffix pattern; write the full module path from the root "
                        f"(e.g. {family_default_targets(self.family)[0]!r}), since bare leaf names also match "
                        "vision-tower modules"
                    )
        set_("target_parameters", _strs(self.target_parameters, "target_parameters"))
        if any(not t or t.startswith(".") or "*" in t for t in self.target_parameters):
            problems.append(f"target_parameters are parameter names like 'mlp.experts.gate_up_proj' (no regex), got {list(self.target_parameters)}")
        if not self.targets and not self.vision_targets and not self.target_parameters:
            problems.append("needs at least one LoRA target (targets, vision_targets or target_parameters)")

        logical = family_modules(self.family)
        set_("train_modules", _strs(self.train_modules, "train_modules"))
        for name in self.train_modules:
            if name not in logical:
                problems.append(f"train_modules: unknown module {name!r} for {self.family}{close(name, logical)}; known: {', '.join(logical)}")
        if len(set(self.train_modules)) != len(self.train_modules):
            problems.append(f"train_modules: duplicates in {list(self.train_modules)}")

        tokens = self.trainable_tokens
        if isinstance(tokens, Mapping):
            norm = {}
            for key, ids in tokens.items():
                if not isinstance(key, str) or not key:
                    problems.append(f"trainable_tokens: keys must be module names, got {key!r}")
                    continue
                norm[key] = _ids(ids, f"trainable_tokens[{key!r}]")
                if not norm[key]:
                    problems.append(f"trainable_tokens[{key!r}]: empty list of token ids")
                if key in logical and key in self.train_modules:
                    problems.append(f"{key!r} is both in train_modules and trainable_tokens; train it whole or by rows, not both")
            if not norm:
                problems.append("trainable_tokens: empty mapping")
            set_("trainable_tokens", norm)
        elif tokens is not None:
            set_("trainable_tokens", _ids(tokens, "trainable_tokens"))
            both = [m for m in ("embed", "lm_head") if m in self.train_modules]
            if both:
                problems.append(f"trainable_tokens (rows of embed and lm_head) conflicts with train_modules {both}; train them whole or by rows, not both")

        set_("freeze", _strs(self.freeze, "freeze"))
        for part in self.freeze:
            if part not in FREEZABLE:
                problems.append(f"freeze: unknown component {part!r}{close(part, FREEZABLE)}; known: {', '.join(FREEZABLE)}")
        if "vision" in self.freeze and self.vision_targets:
            problems.append("vision_targets given but the vision tower is frozen (remove 'vision' from freeze)")
        if "language" in self.freeze and self.targets:
            problems.append("targets given but the language model is frozen (remove 'language' from freeze)")
        for name, part in (("merger", "merger"), ("vision", "vision"), ("norm", "language")):
            if name in self.train_modules and part in self.freeze:
                problems.append(f"train_modules has {name!r} but freeze has {part!r}")

        if self.tied not in TIED_POLICIES:
            problems.append(f"tied must be one of {', '.join(TIED_POLICIES)}, got {self.tied!r}{close(str(self.tied), TIED_POLICIES)}")
        set_("save", _strs(self.save, "save"))
        for fmt in self.save:
            if fmt not in SAVE_FORMATS:
                problems.append(f"save: unknown format {fmt!r}{close(fmt, SAVE_FORMATS)}; known: {', '.join(SAVE_FORMATS)}")
        if not self.save or len(set(self.save)) != len(self.save):
            problems.append(f"save must list each format at most once and at least one, got {list(self.save)}")

    # -- construction -------------------------------------------------------------------------------------

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Recipe":
        """Build from a mapping (YAML/JSON). ``base: <registered name>`` starts from that recipe."""
        if not isinstance(data, Mapping):
            raise RecipeError(f"a recipe must be a mapping, got {type(data).__name__}")
        data = dict(data)
        base = data.pop("base", None)
        _check_keys(data, data.get("name") or base or "<unnamed>")
        if base is not None:
            from .registry import get_recipe

            return get_recipe(base).with_overrides(**data)
        missing = [k for k in ("name", "family") if k not in data]
        if missing:
            raise RecipeError(f"recipe {data.get('name', '<unnamed>')}: missing {', '.join(missing)} (or give 'base: <recipe name>')")
        return cls(**data)

    def with_overrides(self, **changes: Any) -> "Recipe":
        """A validated copy with some fields changed (``targets=None`` = family defaults)."""
        _check_keys(changes, self.name)
        if "family" in changes and changes["family"] != self.family and "targets" not in changes and self.targets == family_default_targets(self.family):
            changes["targets"] = None  # the old family's defaults would not fit the new family
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, dicts), loadable again with ``from_dict``."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Mapping):
                v = {k: list(ids) for k, ids in v.items()}
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out

    # -- model-facing (implemented in apply.py) -------------------------------------------------------------

    def lora_config(self, model):
        """The ``peft.LoraConfig`` this recipe means for ``model`` (checked against its modules)."""
        from .apply import plan_recipe

        return plan_recipe(model, self).lora_config()


# PEFT / trainer spellings people bring along -> our field
_ALIASES = {"rank": "r", "lora_r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "target_modules": "targets",
            "modules_to_save": "train_modules", "trainable_token_indices": "trainable_tokens",
            "ensure_weight_tying": "tied", "tie": "tied"}


def _check_keys(data: Mapping[str, Any], label: str) -> None:
    known = Recipe.fields()
    unknown = [k for k in data if k not in known]
    if unknown:
        hints = "".join(f" (did you mean: {_ALIASES[k]}?)" if k in _ALIASES else close(str(k), known, n=1) for k in unknown)
        raise RecipeError(f"recipe {label}: unknown field(s) {', '.join(map(str, unknown))}{hints}; known: {', '.join(known)}")


def load_recipe_file(path: str | Path) -> Recipe:
    """A recipe from a YAML/JSON file.

    The file is either a recipe mapping (``name``, ``family``, ... or ``base`` + overrides), or a larger
    file (e.g. a qvl-train config) with a ``recipe:`` key holding a registered name or such a mapping;
    its other top-level keys are ignored here.
    """
    import yaml

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as e:
        raise RecipeError(f"cannot read recipe file {p}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe file {p} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, Mapping):
        raise RecipeError(f"recipe file {p} must hold a mapping")
    if "recipe" in data:
        inner = data["recipe"]
        if isinstance(inner, str):
            from .registry import get_recipe

            return get_recipe(inner)
        data = inner
    try:
        return Recipe.from_dict(data)
    except RecipeError as e:
        raise RecipeError(f"{p}: {e}") from None
