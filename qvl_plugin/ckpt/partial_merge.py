"""Partial merge for a serving engine: bake what the engine cannot serve, keep the rest as a LoRA.

``merge SRC --base BASE -o OUT --serve vllm`` writes ``OUT/base`` (BASE with the adapter parts the engine
refuses or ignores merged in: modules_to_save, trainable-token rows, LoRA on the vision tower and merger,
DoRA or lora_bias modules, trained biases, embedding LoRA -- whatever ``qvl_plugin/serving/<engine>.json``
marks ``bake``) and ``OUT/adapter`` (the remaining LoRA pairs, a plain PEFT adapter the engine serves with
multi-LoRA). Base + adapter compute what the trained PeftModel computed: PEFT's forward is the base plus
independent per-module deltas, with modules_to_save and token rows replacing base values.

The base is written by the streaming merge itself (``merge.merge`` on a filtered view of SRC); the whole
OUT is one hidden temp dir renamed into place (``outputs.install_dir``), so a failure leaves no OUT.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..errors import AdapterConfigError
from .convert import infer_adapter_config, write_adapter_dir
from .keys import Role
from .merge import MergeReport, merge, open_adapter, open_base
from .outputs import check_output, install_dir, os_error_text, temp_dir_for
from .serve_audit import baked_entries, serve_findings
from .view import Checkpoint, Entry, open_checkpoint
from .writer import WriteError

__all__ = ["PartialMergeReport", "partial_merge"]

# adapter_config.json fields that describe what was baked: the leftover adapter must not claim them
_CLEARED = {"modules_to_save": None, "trainable_token_indices": None, "use_dora": False, "lora_bias": False, "bias": "none"}


@dataclass
class PartialMergeReport:
    out: Path
    engine: str
    base: MergeReport
    baked: list[str]                       # adapter keys merged into OUT/base
    kept: list[str]                        # adapter keys written to OUT/adapter
    rules: list[str]                       # the engine rules that decided the baking
    adapter: Path | None                   # None when nothing was left to serve as a LoRA
    leftover_findings: list[str] = field(default_factory=list)  # serve-audit codes on OUT/adapter (expected none)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"out": str(self.out), "engine": self.engine, "base": self.base.to_dict(), "baked": self.baked,
                "kept": self.kept, "rules": self.rules, "adapter": str(self.adapter) if self.adapter else None,
                "leftover_findings": self.leftover_findings, "notes": self.notes}


def _view(ckpt: Checkpoint, entries: list[Entry]) -> Checkpoint:
    """The same adapter restricted to ``entries``; closing it leaves the original open."""
    return dataclasses.replace(ckpt, entries=entries, findings=list(ckpt.findings), _close=lambda: None)


def _leftover_config(ckpt: Checkpoint, kept: list[Entry], base_dir: Path) -> dict:
    cfg = infer_adapter_config(_view(ckpt, kept))
    cfg.update(_CLEARED)
    modules = sorted({e.module for e in kept if e.role in (Role.LORA_A, Role.EMB_A)})
    cfg["target_modules"] = "(" + "|".join(re.escape(m) for m in modules) + ")"  # exactly the modules left
    cfg["base_model_name_or_path"] = str(base_dir)
    for key in ("rank_pattern", "alpha_pattern"):  # patterns stay valid: same module names
        cfg[key] = dict(cfg.get(key) or {})
    return cfg


def partial_merge(
    src: str | Path,
    base: str | Path,
    out: str | Path,
    *,
    engine: str = "vllm",
    adapter_config: str | Path | None = None,
    lora_alpha: float | None = None,
    dtype: str | torch.dtype | None = "auto",
    max_shard_size: int | str = "5GB",
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
    direct_io: bool = True,
) -> PartialMergeReport:
    """Write OUT/base (BASE + what ``engine`` cannot serve) and OUT/adapter (the LoRA it can), atomically."""
    out = check_output(out, [src, base], force)
    base_ckpt = open_base(base)
    try:
        ad = open_adapter(src, base_ckpt, adapter_config=adapter_config, lora_alpha=lora_alpha)
    finally:
        base_ckpt.close()  # merge() opens it again; only its layout was needed here
    with ad:
        errors = [f for f in ad.findings if f.severity == "error"]
        if errors:
            raise AdapterConfigError(f"{ad.path.name}: {errors[0].message}")
        baked, hits = baked_entries(ad, engine)
        baked_keys = {e.key for e in baked}
        kept = [e for e in ad.entries if e.key not in baked_keys]
        notes = []
        tmp = temp_dir_for(out)
        try:
            base_report = merge(_view(ad, baked), base, tmp / "base", dtype=dtype, max_shard_size=max_shard_size,
                                progress=progress, direct_io=direct_io)
            adapter_dir, leftover = None, []
            if kept:
                adapter_dir = out / "adapter"
                _write_adapter(ad, kept, tmp / "adapter", out / "base", [src, base])
                with open_checkpoint(tmp / "adapter") as left:
                    leftover = [f.code for f in serve_findings(left, engine) if f.severity == "error"]
                if leftover:  # a rule the partial merge does not bake: say so rather than write a broken pair
                    raise AdapterConfigError(f"the adapter left after baking still fails the {engine} rules: {', '.join(leftover)}")
            else:
                notes.append("nothing is left to serve as a LoRA: OUT/base is the full merge and there is no OUT/adapter")
            check_output(out, [src, base], force=True)  # inputs swapped for links into OUT while we wrote?
            install_dir(tmp, out, force)
        except OSError as e:
            raise WriteError(f"cannot write {out}: {os_error_text(e)}; nothing was written to {out.name}") from None
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return PartialMergeReport(out=out, engine=engine, base=dataclasses.replace(base_report, out=out / "base"),
                                  baked=sorted(baked_keys), kept=[e.key for e in kept],
                                  rules=sorted({h.rule.id for h in hits}), adapter=adapter_dir,
                                  leftover_findings=leftover, notes=notes + base_report.notes)


def _write_adapter(ckpt: Checkpoint, kept: list[Entry], out: Path, final_base: Path, inputs) -> None:
    write_adapter_dir(ckpt, kept, _leftover_config(ckpt, kept, final_base), out, inputs)
