"""Module names inside adapter_config.json, checked and mapped with PEFT's own matching rules.

An adapter trained on transformers < 4.52 names modules in the hub layout (``model.layers.0.mlp.down_proj``,
``visual.blocks.0.attn.qkv``), in ``target_modules``, pattern keys and ``modules_to_save`` alike. PEFT on
current transformers matches those names against the in-memory layout (``model.language_model.*``), so a
full-path legacy name matches nothing (``NoMatchingPeftModuleError``) or silently drops a module. Here every
name is mapped with the family's disk -> memory renames, and the result is *verified* with PEFT's matching
(``check_target_module_exists``, ``get_pattern_key``, the ``endswith`` rule of modules_to_save) against the
modules the adapter really carries; where a rewrite cannot be verified, exact module paths are written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Iterable, Mapping

from ..layouts import Layout

__all__ = ["map_name", "map_regex", "targets_match", "mts_match", "pattern_value", "MappedConfig", "map_config_names"]


def map_name(name: str, layout: Layout) -> str:
    """A plain module name (leaf suffix or full path) in the canonical layout; suffixes stay as they are."""
    mapped = layout.canonical(name)
    if mapped == name:
        return name
    # Only accept a rename that inserts whole path segments ("model.layers" -> "model.language_model.layers"),
    # never one that cuts into a segment ("model_x" -> "model.language_model_x").
    it = iter(mapped.split("."))
    return mapped if all(seg in it for seg in name.split(".")) else name


def map_regex(pattern: str, layout: Layout) -> str:
    """A regex over module paths with its literal leading path mapped like :func:`map_name` (unverified)."""
    lead = re.match(r"[\^(]*", pattern).group()
    body = pattern[len(lead):]
    plain = body.replace("\\.", ".")
    mapped = map_name(plain, layout)
    if mapped == plain:
        return pattern
    k = 0  # the renames rewrite a prefix: find the common tail, escape only the new head
    while k < min(len(plain), len(mapped)) and plain[-1 - k] == mapped[-1 - k]:
        k += 1
    old_head, new_head = plain[: len(plain) - k], mapped[: len(mapped) - k]
    pos = n = 0
    while n < len(old_head):  # walk the escaped body until len(old_head) unescaped characters are consumed
        pos += 2 if body.startswith("\\.", pos) else 1
        n += 1
    return lead + re.escape(new_head) + body[pos:]


def targets_match(cfg: Mapping, module: str) -> bool:
    """PEFT's decision whether ``target_modules`` (with exclusions, modules_to_save) wraps ``module``.

    The rules of peft 0.21 ``check_target_module_exists`` (tests/ckpt/test_config_names.py holds them equal):
    importing PEFT costs seconds per command, so PEFT itself decides only where ``layers_to_transform`` is set.
    """
    targets = cfg.get("target_modules")
    if targets is None:
        return False
    if cfg.get("layers_to_transform") not in (None, []):
        from peft.tuners.tuners_utils import check_target_module_exists

        keys = ("target_modules", "target_parameters", "exclude_modules", "modules_to_save", "layers_to_transform", "layers_pattern")
        return bool(check_target_module_exists(SimpleNamespace(**{k: cfg.get(k) for k in keys}), module))
    exc = cfg.get("exclude_modules")
    if exc:
        if isinstance(exc, str):
            if re.fullmatch(exc, module):
                return False
        elif module in exc or any(module.endswith(f".{x}") for x in exc):
            return False
    if any(re.match(rf"(^|.*\.){m}($|\..*)", module) for m in cfg.get("modules_to_save") or ()):
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return module in targets or any(module.endswith(f".{t}") for t in targets)


def mts_match(names: Iterable[str] | None, module: str) -> bool:
    """PEFT's modules_to_save rule (``_set_trainable``): a plain ``endswith``."""
    return any(module.endswith(n) for n in names or ())


def pattern_value(patterns: Mapping[str, float], module: str):
    """The rank/alpha pattern value PEFT's ``get_pattern_key`` picks for ``module`` (None: the default)."""
    for key in patterns or ():
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return None


@dataclass
class MappedConfig:
    config: dict
    changed: list[str] = field(default_factory=list)  # the fields rewritten
    notes: list[str] = field(default_factory=list)


def map_config_names(cfg: Mapping, layout: Layout, lora_modules: Iterable[str], full_modules: Iterable[str] = ()) -> MappedConfig:
    """``cfg`` with every module name in the canonical layout, verified against the adapter's own modules.

    ``lora_modules``/``full_modules``: canonical paths of the modules holding LoRA tensors / full
    (modules_to_save) tensors. A name that already resolves is kept; a config written for the hub layout
    is mapped; an unverifiable rewrite becomes the exact module paths (noted).
    """
    out = dict(cfg)
    lora = sorted(set(lora_modules))
    full = sorted(set(full_modules))
    res = MappedConfig(out)

    def names_in_cfg_layout(m: str) -> str:  # how the config's author would have named a canonical module
        return layout.disk(m) if legacy else m

    legacy = _is_legacy(cfg, layout)

    # modules_to_save first: target matching excludes them
    mts = cfg.get("modules_to_save")
    if isinstance(mts, list):
        new = [map_name(n, layout) for n in mts]
        new += [m for m in full if not mts_match(new, m)]  # never drop a saved module
        if new != mts:
            out["modules_to_save"], _ = new, res.changed.append("modules_to_save")
    tti = cfg.get("trainable_token_indices")
    if isinstance(tti, dict):
        new_tti = {map_name(k, layout): v for k, v in tti.items()}
        if new_tti != tti:
            out["trainable_token_indices"], _ = new_tti, res.changed.append("trainable_token_indices")
    exc = cfg.get("exclude_modules")
    if isinstance(exc, list):
        new_exc = [map_name(n, layout) for n in exc]
        if new_exc != exc:
            out["exclude_modules"], _ = new_exc, res.changed.append("exclude_modules")
    elif isinstance(exc, str) and map_regex(exc, layout) != exc:
        out["exclude_modules"], _ = map_regex(exc, layout), res.changed.append("exclude_modules")

    tm = cfg.get("target_modules")
    if tm is not None and lora and not all(targets_match(out, m) for m in lora):
        cand = map_regex(tm, layout) if isinstance(tm, str) else [map_name(t, layout) for t in tm]
        trial = {**out, "target_modules": cand}
        if not all(targets_match(trial, m) for m in lora):
            cand = lora
            res.notes.append("target_modules could not be mapped to the written layout: written as the exact module paths")
        out["target_modules"] = cand
        res.changed.append("target_modules")

    for field_name in ("rank_pattern", "alpha_pattern"):
        pats = cfg.get(field_name) or {}
        if not pats:
            continue
        want = {m: pattern_value(pats, names_in_cfg_layout(m)) for m in lora}
        if all(pattern_value(pats, m) == v for m, v in want.items()):
            continue
        cand = {map_regex(k, layout): v for k, v in pats.items()}
        if not all(pattern_value(cand, m) == v for m, v in want.items()):
            cand = {re.escape(m): v for m, v in want.items() if v is not None}
            res.notes.append(f"{field_name} could not be mapped to the written layout: written for the exact module paths")
        out[field_name] = cand
        res.changed.append(field_name)
    return res


def _is_legacy(cfg: Mapping, layout: Layout) -> bool:
    """True when some module name in the config is written in the hub (pre-4.52) layout."""
    names: list[str] = []
    tm = cfg.get("target_modules")
    names += [tm] if isinstance(tm, str) else list(tm or [])
    names += list(cfg.get("modules_to_save") or [])
    for f in ("rank_pattern", "alpha_pattern"):
        names += list((cfg.get(f) or {}).keys())
    return any(map_regex(n, layout) != n for n in names)
