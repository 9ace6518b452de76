"""Extract a PEFT adapter from a merged model: ``merged - base``, one tensor at a time.

Changed Linear weights (and conv weights, as ``(out, in·k)`` matrices) become LoRA pairs by truncated SVD
in fp32 (``B = U·√S``, ``A = √S·Vᵀ``, scaling 1); a changed embedding or head, norm or other tensor is saved whole as
``modules_to_save``; changed biases of LoRA'd layers are saved as ``base_layer.bias``. Unchanged tensors
are skipped. For each module the relative reconstruction error ``||ΔW - B·A||_F / ||ΔW||_F`` is
reported; it is computed from the discarded singular values (exactly, from the factors, on the randomized
path), so merging the adapter back reproduces the merged weights within it (plus the output dtype's rounding).

Large matrices whose kept rank is known up front (a fixed ``--rank``, or ``--max-rank``) take a randomized
truncated SVD (``torch.svd_lowrank``, seeded: reproducible) instead of the full one: O(out·in·q) instead of
O(out·in·min(out, in)). ``--device`` runs the SVDs on a GPU when there is one.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..errors import CheckpointError, UsageError
from .devices import resolve_device, to_device
from .keys import PEFT_PREFIX
from .merge_plan import open_base
from .reader import TensorReader, equal_rows
from .view import Checkpoint, Entry
from .shards import TensorSpec, plan_shards
from .svd import SVD_METHODS, choose_rank, svd_factors, truncated_svd
from .tokenizer_files import tokenizer_files
from .writer import CheckpointWriter

DUMMY_TARGET_MODULES = "dummy-target-modules"

__all__ = ["ModuleError", "ExtractReport", "extract", "svd_factors", "choose_rank", "SVD_METHODS"]

@dataclass(frozen=True)
class ModuleError:
    """One extracted module: how it was stored and how well."""

    module: str
    kind: str           # lora | full | bias
    rank: int | None
    rel_error: float    # ||ΔW - B@A|| / ||ΔW|| (0 for full tensors)
    numel: int
    svd: str | None = None  # exact | lowrank (LoRA modules)

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
    device: str = "cpu"
    seconds: dict[str, float] = field(default_factory=dict)  # svd: the factorisations; total: the whole call

    @property
    def max_rel_error(self) -> float:
        return max((m.rel_error for m in self.modules), default=0.0)

    def to_dict(self) -> dict:
        return {"out": str(self.out), "modules": [m.to_dict() for m in self.modules], "unchanged": self.unchanged,
                "max_rel_error": self.max_rel_error, "config": self.config, "notes": self.notes, "copied": self.copied,
                "device": self.device, "seconds": self.seconds}


def _changed(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x.shape != y.shape or not torch.equal(x, y)


def _differs(mr: TensorReader, br: TensorReader, m: Entry, b: Entry) -> bool:
    """MERGED's tensor differs from BASE's: row chunk by row chunk when shape and dtype agree."""
    if m.shape == b.shape and m.dtype == b.dtype:
        return not equal_rows(mr, m, b, br)
    x, y = mr.whole(m), br.whole(b)
    return _changed(x, y.to(x.dtype) if y.dtype != x.dtype else y)


def extract(
    merged: str | Path,
    base: str | Path,
    out: str | Path,
    *,
    rank: int | str = 16,
    energy: float = 0.99,
    max_rank: int | None = None,
    sv_epsilon: float = 0.0,
    include: str | None = None,
    exclude: str | None = None,
    svd: str = "auto",
    device: str | torch.device | None = "auto",
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> ExtractReport:
    """Write the PEFT adapter that turns BASE into MERGED (LoRA by SVD where it is a Linear).

    ``max_rank`` caps every LoRA rank (and bounds the randomized SVD with ``rank="auto"``); ``sv_epsilon``
    drops singular values at or below it; ``include``/``exclude`` are regexes (``re.search``) on module names:
    modules left out are not read and not in the adapter (noted). ``svd``: auto | exact | lowrank.
    """
    t0 = time.perf_counter()
    if rank != "auto" and (not isinstance(rank, int) or rank < 1):
        try:
            rank = int(rank)
        except (TypeError, ValueError):
            raise UsageError(f"--rank must be a positive number or 'auto', not {rank!r}") from None
        if rank < 1:
            raise UsageError(f"--rank must be a positive number or 'auto', not {rank!r}")
    if not 0.0 < energy <= 1.0:
        raise UsageError(f"--energy must be in (0, 1], not {energy}")
    if max_rank is not None and (not isinstance(max_rank, int) or max_rank < 1):
        raise UsageError(f"--max-rank must be a positive number, not {max_rank!r}")
    if not sv_epsilon >= 0.0 or math.isinf(sv_epsilon):
        raise UsageError(f"--sv-epsilon must be a finite number >= 0, not {sv_epsilon}")
    if svd not in SVD_METHODS:
        raise UsageError(f"--svd must be one of {', '.join(SVD_METHODS)}, not {svd!r}")
    opts = _Options(rank, energy, max_rank, sv_epsilon, _regex(include, "--include"), _regex(exclude, "--exclude"), svd,
                    resolve_device(device))
    with open_base(merged) as m_ckpt, open_base(base) as b_ckpt:
        report = _extract(m_ckpt, b_ckpt, Path(out), opts, force, progress, merged, base)
    report.seconds["total"] = round(time.perf_counter() - t0, 4)
    return report


@dataclass
class _Options:
    rank: int | str
    energy: float
    max_rank: int | None
    sv_epsilon: float
    include: re.Pattern | None
    exclude: re.Pattern | None
    svd: str
    device: torch.device
    svd_seconds: float = 0.0

    def wanted(self, module: str) -> bool:
        return (self.include is None or self.include.search(module) is not None) and (self.exclude is None or self.exclude.search(module) is None)


def _regex(pattern: str | None, option: str) -> re.Pattern | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as e:
        raise UsageError(f"{option} {pattern!r} is not a valid regular expression: {e}") from None


def _targets(ckpt: Checkpoint) -> dict[str, Entry]:
    out: dict[str, Entry] = {}
    for e in ckpt.entries:
        if e.target in out:
            raise CheckpointError(f"{ckpt.path.name}: two tensors named {e.target!r}")
        out[e.target] = e
    return out


def _extract(mc: Checkpoint, bc: Checkpoint, out: Path, opts: _Options, force, progress, merged_path, base_path) -> ExtractReport:
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
        report = _run(mc, bc, mt, bt, mr, br, emb, head, out, opts, force, progress, merged_path, base_path)
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


def _run(mc, bc, mt, bt, mr, br, emb, head, out, opts: _Options, force, progress, merged_path, base_path) -> ExtractReport:
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
    left_out = 0
    # one module at a time: its tensors are read once and released
    for n, (module, names) in enumerate(sorted(by_module.items())):
        if not opts.wanted(module):
            left_out += 1
            if progress is not None:
                progress(n + 1, total)
            continue
        params = []
        for t in names:  # compared in row chunks: an unchanged (embedding-sized) tensor is never held whole
            if _differs(mr, br, mt[t], bt[t]):
                params.append(t.rpartition(".")[2])
            else:
                unchanged += 1
        if params:
            values = {t: mr.whole(mt[t]) for t in names}
            bases = {t: br.whole(bt[t]) for t in names}
            _one_module(module, sorted(params), names, values, bases, mt, specials, mc, opts, tensors, modules, lora_modules, full_modules)
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
    if left_out:
        notes.append(f"{left_out} module(s) left out by --include/--exclude (not read, not in the adapter)")
    if not lora_modules and not full_modules and not modules:
        notes.append("MERGED equals BASE: the adapter is empty" if not left_out else "no selected module changed: the adapter is empty")
    return ExtractReport(out=Path(out).absolute(), modules=modules, unchanged=unchanged, config=cfg, notes=notes,
                         copied=[f.name for f in copied], device=str(opts.device), seconds={"svd": round(opts.svd_seconds, 4)})


def _one_module(module, params, names, values, bases, mt, specials, mc, opts: _Options, tensors, modules, lora_modules, full_modules) -> None:
    w_t = f"{module}.weight"
    is_lora = (
        "weight" in params and w_t not in specials and len(mt[w_t].shape) >= 2 and mt[w_t].dtype.is_floating_point
        and not _is_embedding_like(module, mc) and set(params) <= {"weight", "bias"}
    )
    if is_lora:  # Linear (out, in), or ConvNd (out, in, *k) as the matrix (out, in·k)
        shape = tuple(mt[w_t].shape)
        dev = opts.device
        delta = (to_device(values[w_t], dev).float() - to_device(bases[w_t], dev).float()).reshape(shape[0], -1)
        t0 = time.perf_counter()
        a, b, err, how = truncated_svd(delta, opts.rank, opts.energy, max_rank=opts.max_rank, sv_epsilon=opts.sv_epsilon, method=opts.svd, device=dev)
        opts.svd_seconds += time.perf_counter() - t0
        del delta
        if len(shape) > 2:  # conv LoRA: A (r, in, *k), B (out, r, 1, ...)
            a = a.reshape((a.shape[0],) + shape[1:]).contiguous()
            b = b.reshape(b.shape + (1,) * (len(shape) - 2)).contiguous()
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b
        # a raw-parameter module (the MoE router) is no Linear: PEFT reaches it through target_parameters
        lora_modules[f"{module}.weight" if mc.layout.module_parameters(module) else module] = a.shape[0]
        modules.append(ModuleError(module, "lora", a.shape[0], err, math.prod(mt[w_t].shape), how))
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
