"""Extract a PEFT adapter from a merged model: ``merged - base``, one tensor at a time.

Changed Linear weights (and conv weights, as ``(out, in·k)`` matrices) become LoRA pairs by truncated SVD
in fp32 (``B = U·√S``, ``A = √S·Vᵀ``, scaling 1); a changed embedding or head, norm or other tensor is saved whole as
``modules_to_save``; changed biases of LoRA'd layers are saved as ``base_layer.bias``. Unchanged tensors
are skipped. For each module the relative reconstruction error ``||ΔW - B·A||_F / ||ΔW||_F`` is
reported; it is computed from the discarded singular values, so merging the adapter back reproduces the
merged weights within it (plus the output dtype's rounding).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..errors import CheckpointError, UsageError
from .keys import PEFT_PREFIX
from .merge_plan import open_base
from .reader import TensorReader
from .view import Checkpoint, Entry
from .shards import TensorSpec, plan_shards
from .tokenizer_files import tokenizer_files
from .writer import CheckpointWriter

DUMMY_TARGET_MODULES = "dummy-target-modules"

__all__ = ["ModuleError", "ExtractReport", "extract", "svd_factors", "choose_rank"]


@dataclass(frozen=True)
class ModuleError:
    """One extracted module: how it was stored and how well."""

    module: str
    kind: str           # lora | full | bias
    rank: int | None
    rel_error: float    # ||ΔW - B@A|| / ||ΔW|| (0 for full tensors)
    numel: int

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class ExtractReport:
    out: Path
    modules: list[ModuleError]
    unchanged: int
    config: dict
    notes: list[str] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)  # tokenizer files carried over (a resized vocabulary)

    @property
    def max_rel_error(self) -> float:
        return max((m.rel_error for m in self.modules), default=0.0)

    def to_dict(self) -> dict:
        return {"out": str(self.out), "modules": [m.to_dict() for m in self.modules], "unchanged": self.unchanged,
                "max_rel_error": self.max_rel_error, "config": self.config, "notes": self.notes, "copied": self.copied}


def choose_rank(singular_values: torch.Tensor, rank: int | str, energy: float) -> int:
    """A fixed rank (capped by the matrix), or ``auto``: the smallest rank keeping ``energy`` of ``Σσ²``."""
    n = singular_values.numel()
    if rank != "auto":
        return max(1, min(int(rank), n))
    power = singular_values.double() ** 2
    total = float(power.sum())
    if total == 0.0:
        return 1
    kept = torch.cumsum(power, 0) / total
    return max(1, min(n, int(torch.searchsorted(kept, torch.tensor(energy, dtype=kept.dtype)).item()) + 1))


def svd_factors(delta: torch.Tensor, rank: int | str = 16, energy: float = 0.99) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``delta (out, in)`` -> ``(A (r, in), B (out, r), rel_error)`` with ``B @ A`` the best rank-r fit."""
    d = delta.float()
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    r = choose_rank(s, rank, energy)
    root = s[:r].sqrt()
    b = (u[:, :r] * root).contiguous()
    a = (root[:, None] * vh[:r]).contiguous()
    power = s.double() ** 2
    total = float(power.sum())
    err = math.sqrt(max(0.0, float(power[r:].sum())) / total) if total > 0 else 0.0
    return a, b, err


def _changed(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x.shape != y.shape or not torch.equal(x, y)


def extract(
    merged: str | Path,
    base: str | Path,
    out: str | Path,
    *,
    rank: int | str = 16,
    energy: float = 0.99,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> ExtractReport:
    """Write the PEFT adapter that turns BASE into MERGED (LoRA by SVD where it is a Linear)."""
    if rank != "auto" and (not isinstance(rank, int) or rank < 1):
        try:
            rank = int(rank)
        except (TypeError, ValueError):
            raise UsageError(f"--rank must be a positive number or 'auto', not {rank!r}") from None
        if rank < 1:
            raise UsageError(f"--rank must be a positive number or 'auto', not {rank!r}")
    if not 0.0 < energy <= 1.0:
        raise UsageError(f"--energy must be in (0, 1], not {energy}")
    with open_base(merged) as m_ckpt, open_base(base) as b_ckpt:
        return _extract(m_ckpt, b_ckpt, Path(out), rank, energy, force, progress, merged, base)


def _targets(ckpt: Checkpoint) -> dict[str, Entry]:
    out: dict[str, Entry] = {}
    for e in ckpt.entries:
        if e.target in out:
            raise CheckpointError(f"{ckpt.path.name}: two tensors named {e.target!r}")
        out[e.target] = e
    return out


def _extract(mc: Checkpoint, bc: Checkpoint, out: Path, rank, energy, force, progress, merged_path, base_path) -> ExtractReport:
    mt, bt = _targets(mc), _targets(bc)
    emb = f"{bc.layout.embedding}.weight" if bc.layout.embedding else None
    head = f"{bc.layout.head}.weight" if bc.layout.head else "lm_head.weight"
    tied_base = head not in bt and emb in bt
    if tied_base and head in mt:
        bt = dict(bt)
        bt[head] = bt[emb]  # the base's head is its embedding
    only_merged = sorted(set(mt) - set(bt))
    only_base = sorted(set(bt) - set(mt) - ({head} if tied_base else set()))
    if only_merged or only_base:
        what = only_merged[:3] or only_base[:3]
        raise CheckpointError(
            f"MERGED and BASE hold different tensors ({len(only_merged)} only in MERGED, {len(only_base)} only in BASE, e.g. {what}); wrong base?"
        )
    shapes = [t for t in mt if t in bt and mt[t].shape != bt[t].shape]
    rows = _resized_rows(shapes, mt, bt, emb, head)
    if shapes and rows is None:
        raise CheckpointError(f"MERGED and BASE shapes differ for {len(shapes)} tensors, e.g. {shapes[0]!r} (wrong base?)")

    mr, br = TensorReader(mc), TensorReader(bc)
    try:
        report = _run(mc, bc, mt, bt, mr, br, emb, head, out, rank, energy, force, progress, merged_path, base_path)
        if rows is not None:
            report.notes.append(f"vocabulary resized from {bt[emb].shape[0]} to {rows} rows: embedding and lm_head saved "
                                f"whole (modules_to_save) with {rows} rows" + (", MERGED's tokenizer files copied" if report.copied else ""))
        return report
    finally:
        mr.close()
        br.close()


def _resized_rows(shapes: list[str], mt: dict[str, Entry], bt: dict[str, Entry], emb: str | None, head: str) -> int | None:
    """New tokens: only the embedding/head rows differ (both alike, or the tied embedding alone) -> the rows."""
    if not shapes or emb not in mt or not set(shapes) <= {emb, head}:
        return None
    e, b = mt[emb].shape, bt[emb].shape
    if len(e) != 2 or len(b) != 2 or e[1] != b[1] or (head in mt and mt[head].shape != e):
        return None
    return e[0]


def _run(mc, bc, mt, bt, mr, br, emb, head, out, rank, energy, force, progress, merged_path, base_path) -> ExtractReport:
    specials = {t for t in (emb, head) if t}
    tensors: dict[str, torch.Tensor] = {}
    modules: list[ModuleError] = []
    lora_modules: dict[str, int] = {}
    full_modules: set[str] = set()
    unchanged = 0
    by_module: dict[str, list[str]] = {}
    for target in mt:
        by_module.setdefault(target.rpartition(".")[0], []).append(target)
    total = len(by_module)
    # one module at a time: its tensors are read once and released
    for n, (module, names) in enumerate(sorted(by_module.items())):
        values = {t: mr.whole(mt[t]) for t in names}
        bases = {t: br.whole(bt[t]) for t in names}
        params = []
        for t in names:
            y = bases[t]
            if _changed(values[t], y.to(values[t].dtype) if y.dtype != values[t].dtype else y):
                params.append(t.rpartition(".")[2])
            else:
                unchanged += 1
        if params:
            _one_module(module, sorted(params), names, values, bases, mt, specials, mc, rank, energy, tensors, modules, lora_modules, full_modules)
        del values, bases
        if progress is not None:
            progress(n + 1, total)

    cfg = _adapter_config(lora_modules, full_modules, modules, base_path)
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    plan = plan_shards(specs, 1 << 62, filename="adapter_model.safetensors")
    with CheckpointWriter(out, plan, inputs=[merged_path, base_path], force=force) as w:
        for spec in plan.order:
            w.write(spec.name, tensors[spec.name])
        w.write_json("adapter_config.json", cfg, sort_keys=True)
        copied = []
        if any(mt[t].shape != bt[t].shape for t in mt if t in bt) and mc.path.is_dir():
            copied = tokenizer_files(mc.path)  # new tokens: the tokenizer that encodes them travels with the rows
            for f in copied:
                w.copy_file(f)
        w.commit()
    notes = []
    if not lora_modules and not full_modules and not modules:
        notes.append("MERGED equals BASE: the adapter is empty")
    return ExtractReport(out=Path(out).absolute(), modules=modules, unchanged=unchanged, config=cfg, notes=notes,
                         copied=[f.name for f in copied])


def _one_module(module, params, names, values, bases, mt, specials, mc, rank, energy, tensors, modules, lora_modules, full_modules) -> None:
    w_t = f"{module}.weight"
    is_lora = (
        "weight" in params and w_t not in specials and len(mt[w_t].shape) >= 2 and mt[w_t].dtype.is_floating_point
        and not _is_embedding_like(module, mc) and set(params) <= {"weight", "bias"}
    )
    if is_lora:  # Linear (out, in), or ConvNd (out, in, *k) as the matrix (out, in·k)
        shape = tuple(mt[w_t].shape)
        delta = (values[w_t].float() - bases[w_t].float()).reshape(shape[0], -1)
        a, b, err = svd_factors(delta, rank, energy)
        del delta
        if len(shape) > 2:  # conv LoRA: A (r, in, *k), B (out, r, 1, ...)
            a = a.reshape((a.shape[0],) + shape[1:]).contiguous()
            b = b.reshape(b.shape + (1,) * (len(shape) - 2)).contiguous()
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b
        # a raw-parameter module (the MoE router) is no Linear: PEFT reaches it through target_parameters
        lora_modules[f"{module}.weight" if mc.layout.module_parameters(module) else module] = a.shape[0]
        modules.append(ModuleError(module, "lora", a.shape[0], err, math.prod(mt[w_t].shape)))
        if "bias" in params:
            tensors[f"{PEFT_PREFIX}{module}.base_layer.bias"] = values[f"{module}.bias"].contiguous()
            modules.append(ModuleError(f"{module}.bias", "bias", None, 0.0, values[f"{module}.bias"].numel()))
    elif params == ["bias"] and values[f"{module}.bias"].dim() == 1:
        tensors[f"{PEFT_PREFIX}{module}.bias"] = values[f"{module}.bias"].contiguous()
        modules.append(ModuleError(f"{module}.bias", "bias", None, 0.0, values[f"{module}.bias"].numel()))
    else:
        # modules_to_save replaces the whole module: every parameter of it, changed or not
        full_modules.add(module)
        for t in sorted(names):
            tensors[f"{PEFT_PREFIX}{t}"] = values[t].contiguous()
        modules.append(ModuleError(module, "full", None, 0.0, sum(values[t].numel() for t in names)))


def _is_embedding_like(module: str, ckpt: Checkpoint) -> bool:
    layout = ckpt.layout
    group = layout.group(module) if layout.groups else "other"
    leaf = module.rsplit(".", 1)[-1]
    return group in ("embedding", "head") or leaf in ("embed_tokens", "wte", "lm_head", "pos_embed", "embed_positions")


def _adapter_config(lora_modules: dict[str, int], full_modules: set[str], modules: list[ModuleError], base) -> dict:
    ranks = list(lora_modules.values())
    common = max(set(ranks), key=ranks.count) if ranks else 8
    others = {re.escape(m): r for m, r in sorted(lora_modules.items()) if r != common}
    bias_modules = {m.module.rsplit(".", 1)[0] for m in modules if m.kind == "bias"}
    return {
        "peft_type": "LORA",
        "task_type": None,
        "r": common,
        "lora_alpha": common,  # scaling 1: B @ A is the delta itself
        "rank_pattern": others,
        "alpha_pattern": dict(others),
        "use_rslora": False,
        "use_dora": False,
        "target_modules": sorted(m for m in lora_modules if not m.endswith(".weight")) or (
            [] if lora_modules else DUMMY_TARGET_MODULES),  # PEFT's marker for a modules_to_save-only adapter
        "target_parameters": sorted(m for m in lora_modules if m.endswith(".weight")) or None,
        "modules_to_save": sorted(full_modules) or None,
        "bias": "all" if bias_modules - set(lora_modules) else "lora_only" if bias_modules else "none",
        "lora_bias": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "lora_dropout": 0.0,
        "inference_mode": True,
        "base_model_name_or_path": str(base),
    }
