"""Audit: do the adapter config's module names resolve on the model PEFT will build?

``PeftModel.from_pretrained`` builds the wrappers from ``target_modules``/``modules_to_save`` matched against
the in-memory module names of *current* transformers (the canonical layout), not from the saved keys. A
config written for the pre-4.52 hub layout (full paths ``model.layers.N.*``), or with a typo, then wraps
nothing (``NoMatchingPeftModuleError``) or leaves saved tensors unloaded. Matching follows PEFT's rules
(:mod:`.config_names`).
"""

from __future__ import annotations

from .config_names import mts_match, targets_match
from .pairs import lora_pairs
from .findings import few, finding
from .view import Checkpoint, Finding, Role

__all__ = ["target_checks"]

_CONVERT = "`qvl-ckpt convert` writes a config mapped to the current layout"


def _modules(ckpt: Checkpoint) -> set[str]:
    """Every module path of a full model (parents included), canonical."""
    out: set[str] = set()
    for e in ckpt.entries:
        parts = e.module.split(".") if e.module else []
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return out


def target_checks(ckpt: Checkpoint, base_ckpt: Checkpoint | None) -> list[Finding]:
    a = ckpt.adapter
    if not ckpt.is_adapter or a is None or not a.raw.get("peft_type") or a.peft_type != "LORA":
        return []
    cfg = a.raw
    pairs = lora_pairs(ckpt.entries)
    lora = sorted({p.module for p in pairs.values()})
    full = sorted({e.module for e in ckpt.entries if e.role is Role.FULL and ".base_layer." not in e.key and e.module not in lora})
    out: list[Finding] = []
    targets = cfg.get("target_modules")
    base_mods = _modules(base_ckpt) if base_ckpt is not None else None
    if targets is not None and not cfg.get("target_parameters"):
        uncovered = [m for m in lora if not targets_match(cfg, m)]
        wrapped = [m for m in sorted(base_mods) if targets_match(cfg, m)] if base_mods is not None else None
        if uncovered or wrapped == []:
            what = (f"target_modules {_show(targets)} match none of {base_ckpt.path.name}'s modules"
                    if wrapped == [] else f"target_modules {_show(targets)} do not match {len(uncovered)} of the {len(lora)} modules holding LoRA tensors ({few(uncovered)})")
            out.append(finding(
                "unresolved-target",
                f"{what} under the current transformers layout: PeftModel.from_pretrained fails (NoMatchingPeftModuleError) "
                f"or leaves that LoRA unloaded; {_CONVERT}",
                uncovered or [str(targets)],
            ))
        elif base_mods is not None and isinstance(targets, list):
            unused = [t for t in targets if not any(targets_match({**cfg, "target_modules": [t]}, m) for m in base_mods)]
            if unused:
                out.append(finding("unused-target", f"target_modules entries match no module of {base_ckpt.path.name}: {few(unused)} (PEFT ignores them; a typo?)", unused))
    mts = cfg.get("modules_to_save")
    if isinstance(mts, list) and full:
        lost = [m for m in full if not mts_match(mts, m)]
        if lost:
            out.append(finding(
                "unresolved-target",
                f"modules_to_save {_show(mts)} do not name {few(lost)} under the current transformers layout: "
                f"PeftModel.from_pretrained fails or drops the saved tensors; {_CONVERT}",
                lost,
            ))
    return out


def _show(x) -> str:
    text = repr(x)
    return text if len(text) <= 80 else text[:77] + "...'"
