"""Declared but not delivered: an adapter whose config names modules_to_save (or trainable tokens) that the
weights file does not hold.

Qwen-VL's finetune.py ``safe_save_model_for_hf_trainer`` (copied into many VL training repos) keeps only
keys containing ``lora_``: the config says ``modules_to_save: [wte, lm_head]`` and the trained copies are
gone. Merging would silently keep the base's modules; PEFT 0.21 fails to load it, older PEFT loads the base
weights. A declared name that matches no module of the model at all is a different case (PEFT ignores it
too, nothing was trained) and is not reported.
"""

from __future__ import annotations

from collections.abc import Iterable

from .findings import finding
from .view import Checkpoint, Finding, Role

__all__ = ["undelivered", "undelivered_finding", "WAYS_OUT"]

WAYS_OUT = ("ways out: a .pth dump of the trainable parameters from the same run (merge/convert that instead); "
            "`qvl-ckpt recover` from the run's DeepSpeed global_step*/ shards (the optimizer states hold the trained "
            "modules); or, for the next run, the recipes' QvlSaveCallback, which saves them")


def _matches(name: str, module: str) -> bool:
    return module == name or module.endswith("." + name)  # PEFT's modules_to_save rule


def _model_modules(ckpt: Checkpoint, base_modules: Iterable[str] | None) -> set[str]:
    if base_modules is not None:
        return set(base_modules)
    known = {m for m in (ckpt.layout.embedding, ckpt.layout.head) if m}  # without a base: what the family has
    return known | {e.module for e in ckpt.entries}


def undelivered(ckpt: Checkpoint, base_modules: Iterable[str] | None = None) -> list[str]:
    """Declared modules_to_save / trainable-token modules that exist in the model but have no weights here."""
    s = ckpt.adapter
    if not ckpt.is_adapter or s is None or not s.raw.get("peft_type"):
        return []
    modules = _model_modules(ckpt, base_modules)
    full = {e.module for e in ckpt.entries if e.role is Role.FULL}
    rows = {e.module for e in ckpt.entries if e.role is Role.TOKEN_ROWS}
    missing = []
    for name in s.modules_to_save or []:
        if any(_matches(name, m) for m in modules) and not any(_matches(name, m) for m in full):
            missing.append(name)
    tti = s.trainable_token_indices
    if tti:
        names = list(tti) if isinstance(tti, dict) else [m.rpartition(".")[2] for m in (ckpt.layout.embedding,) if m]
        head, emb = ckpt.layout.head, ckpt.layout.embedding
        for name in names:
            if head and _matches(name, head) and emb in rows:
                continue  # a tied head shares the embedding's delta: PEFT saves it once, under the embedding
            if any(_matches(name, m) for m in modules) and not any(_matches(name, m) for m in rows):
                missing.append(f"{name} (trainable tokens)")
    return missing


def undelivered_finding(ckpt: Checkpoint, base_modules: Iterable[str] | None = None) -> Finding | None:
    missing = undelivered(ckpt, base_modules)
    if not missing:
        return None
    return finding(
        "missing-modules-to-save",
        f"adapter_config.json declares {', '.join(missing)} as trained whole, but the weights file holds no tensors "
        "for them (saved by a helper that keeps only 'lora_' keys, like Qwen-VL finetune.py's "
        f"safe_save_model_for_hf_trainer): loading or merging it uses the base's untrained modules. {WAYS_OUT}",
    )
