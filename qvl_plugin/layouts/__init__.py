"""Model-family knowledge as data.

One JSON file per family says which modules are the embedding, head, vision tower, merger and language
layers, and how the on-disk hub key layout maps to the in-memory layout of transformers >= 4.52.

The canonical name space of qvl_plugin is the *in-memory* layout (``model.language_model.*``,
``model.visual.*``, ``lm_head``): it is the same for Qwen2-VL, Qwen2.5-VL and Qwen3-VL, so an adapter
whose keys do not reveal its generation still gets one unambiguous name per tensor. Writers map back to
whatever layout their target needs (a merge keeps the base file's own keys).
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Iterable, Mapping

__all__ = ["Layout", "GROUPS", "all_layouts", "get_layout", "detect_layout", "GENERIC"]

GROUPS = ("embedding", "head", "language", "experts", "router", "vision", "merger", "other")


def _transformers_renames(class_name: str | None) -> list[tuple[str, str]] | None:
    """The disk->memory renames transformers itself applies on load, when it has them."""
    if not class_name or "transformers" not in sys.modules:
        # Importing transformers costs seconds per command; the JSON carries the same rules, and
        # tests/layouts checks them against transformers' mapping.
        return None
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:  # transformers < 5 keeps the mapping on the model class instead
        return None
    mapping = get_checkpoint_conversion_mapping(class_name) or []
    renames = []
    for rule in mapping:
        src, dst = getattr(rule, "source_patterns", None), getattr(rule, "target_patterns", None)
        if type(rule).__name__ != "WeightRenaming" or not src or not dst or len(src) != 1 or len(dst) != 1:
            return None
        renames.append((src[0], dst[0]))
    return renames or None


def _transformers_transposes(model_type: str | None) -> list[str] | None:
    """Parameters whose hub files may hold the transpose of the in-memory tensor (dims 1 and 2), from
    transformers' own conversion mapping (``Transpose(1, 2, check_dims=True)``: transposed on load only
    when the file's shape differs from the model's)."""
    if not model_type or "transformers" not in sys.modules:
        return None
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:
        return None
    out = []
    for rule in get_checkpoint_conversion_mapping(model_type) or []:
        ops = getattr(rule, "operations", None) or []
        dst = getattr(rule, "target_patterns", None) or []
        if len(ops) == 1 and type(ops[0]).__name__ == "Transpose" and len(dst) == 1:
            if (ops[0].dim0, ops[0].dim1) in ((1, 2), (2, 1)) and getattr(ops[0], "check_dims", False):
                out.append(dst[0])
    return out or None


@dataclass(frozen=True)
class Layout:
    """What qvl_plugin knows about one model family."""

    name: str
    title: str
    model_types: tuple[str, ...] = ()
    architectures: tuple[str, ...] = ()
    name_hints: tuple[str, ...] = ()
    to_memory: tuple[tuple[str, str], ...] = ()
    to_disk: tuple[tuple[str, str], ...] = ()
    signatures: tuple[str, ...] = ()
    embedding: str | None = None
    head: str | None = None
    groups: tuple[tuple[str, str], ...] = ()
    transposed_on_disk: tuple[str, ...] = ()
    """Parameter suffixes (``mlp.experts.gate_up_proj``) stored (E, in, out) in hub files, (E, out, in) in memory."""
    parameter_modules: tuple[tuple[str, tuple[str, ...]], ...] = ()
    """Module suffix -> its parameters in registration order: the nesting order of PEFT's ParamWrappers."""
    shared_leaves: tuple[str, ...] = ()
    """Leaf names that name several modules of one model (v1: ``c_proj`` is attn's, mlp's and the vision
    tower's): shown with their parent (``attn.c_proj``) so a listed target names only what was targeted."""
    _compiled: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, d: Mapping) -> "Layout":
        to_memory = _transformers_renames(d.get("transformers_mapping")) or [tuple(x) for x in d.get("to_memory", [])]
        return cls(
            name=d["name"],
            title=d.get("title", d["name"]),
            model_types=tuple(d.get("model_types", ())),
            architectures=tuple(d.get("architectures", ())),
            name_hints=tuple(d.get("name_hints", ())),
            to_memory=tuple(tuple(x) for x in to_memory),
            to_disk=tuple(tuple(x) for x in d.get("to_disk", ())),
            signatures=tuple(d.get("signatures", ())),
            embedding=d.get("embedding"),
            head=d.get("head"),
            groups=tuple(tuple(x) for x in d.get("groups", ())),
            transposed_on_disk=tuple(_transformers_transposes(d.get("transformers_converters")) or d.get("transposed_on_disk", ())),
            parameter_modules=tuple((k, tuple(v)) for k, v in (d.get("parameter_modules") or {}).items()),
            shared_leaves=tuple(d.get("shared_leaves", ())),
        )

    def _re(self, pattern: str) -> re.Pattern:
        if pattern not in self._compiled:
            self._compiled[pattern] = re.compile(pattern)
        return self._compiled[pattern]

    def canonical(self, module: str) -> str:
        """Any layout's module path -> the in-memory (canonical) path. Idempotent."""
        for src, dst in self.to_memory:
            module = self._re(src).sub(dst, module, count=1)
        return module

    def is_legacy(self, module: str) -> bool:
        """True when ``module`` is written in the pre-4.52 (hub on-disk) naming."""
        return self.canonical(module) != module

    def disk(self, module: str) -> str:
        """Canonical path -> the family's on-disk hub naming."""
        for src, dst in self.to_disk:
            module = self._re(src).sub(dst, module, count=1)
        return module

    def group(self, module: str) -> str:
        for group, pattern in self.groups:
            if self._re(pattern).search(module):
                return group
        return "other"

    def disk_transposable(self, target: str) -> bool:
        """Can the base file hold this 3-D tensor transposed (dims 1, 2) against memory?"""
        return any(target == t or target.endswith("." + t) for t in self.transposed_on_disk)

    def module_parameters(self, module: str) -> tuple[str, ...] | None:
        """The parameters of a raw-parameter module (fused experts, router), registration order."""
        for suffix, params in self.parameter_modules:
            if module == suffix or module.endswith("." + suffix):
                return params
        return None

    def layer_index(self, module: str) -> int | None:
        m = re.search(r"\.(?:layers|h|blocks|resblocks)\.(\d+)(\.|$)", module)
        return int(m.group(1)) if m else None

    def score(self, modules: Iterable[str]) -> int:
        """How many canonical module paths carry one of this family's signatures."""
        pats = [self._re(p) for p in self.signatures]
        return sum(1 for m in modules if any(p.search(m) for p in pats))


GENERIC = Layout(name="unknown", title="unknown (generic layout)")


@cache
def all_layouts() -> tuple[Layout, ...]:
    files = sorted(f for f in resources.files(__package__).iterdir() if f.name.endswith(".json"))
    return tuple(Layout.from_dict(json.loads(f.read_text())) for f in files)


def get_layout(name: str) -> Layout:
    for layout in all_layouts():
        if layout.name == name:
            return layout
    if name == GENERIC.name:
        return GENERIC
    raise KeyError(name)


# Families with a precise identity; the "-family" layout is the fallback for keys that fit all of them.
# Key scoring keeps the first best: dense Qwen3-VL before MoE (which wins only with expert/router modules);
# name hints test the longer MoE names first ("qwen3-vl" is a prefix of them).
_SPECIFIC = ("qwen3-vl", "qwen3-vl-moe", "qwen2.5-vl", "qwen2-vl", "qwen-vl")


def detect_layout(modules: Iterable[str] = (), config: Mapping | None = None, hint: str | None = None) -> Layout:
    """Pick a family from config.json (model_type/architectures), a name hint, or key signatures.

    ``modules`` may be in any layout; they are canonicalised with the Qwen2-VL renames, which are the
    identity on every other family's names.
    """
    if config:
        archs = set(config.get("architectures") or ())
        model_type = config.get("model_type")
        for layout in all_layouts():
            if archs & set(layout.architectures) or (model_type and model_type in layout.model_types):
                return layout
        if config.get("visual") is not None and model_type == "qwen":
            return get_layout("qwen-vl")
    if hint:
        low = hint.lower()
        for name in sorted(_SPECIFIC, key=lambda n: n != "qwen3-vl-moe"):
            layout = get_layout(name)
            if any(h in low for h in layout.name_hints) or any(a.lower() in low for a in layout.architectures):
                return layout
    family = get_layout("qwen2-vl-family")
    mods = {family.canonical(m) for m in modules}
    best, best_score = None, 0
    for name in _SPECIFIC:
        layout = get_layout(name)
        s = layout.score(mods)
        if s > best_score:
            best, best_score = layout, s
    if best is not None:
        return best
    if family.score(mods):
        return family
    return GENERIC
