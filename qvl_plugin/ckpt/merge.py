"""Merge an adapter (PEFT dir or ``.pth`` dump) into its base, streaming, into a plain HF model dir.

Two steps. :func:`plan_merge` reads headers (and the adapter's values, to check them) and decides, for
every tensor of the base file, what the output holds: the base bytes unchanged, a replacement
(modules_to_save, saved bias), a LoRA/DoRA merge, replaced token rows -- or refuses with the list of
offending keys before anything is written. :func:`merge` then executes the plan: each base tensor is
read once, each output tensor written once, large ones in row chunks, unchanged ones copied file to file.

The math is PEFT's (``merge_math``). Where PEFT's ``merge_and_unload`` differs from the trained
(unmerged) model -- LoRA on a tied embedding -- the merge follows the trained model: the head keeps
what the trained model's head computed with, and the two are written untied (PEFT_FORMAT §3.1).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..errors import CheckpointError
from . import merge_math as mm
from .devices import resolve_device, to_cpu, to_device
from .merge_ops import MergeError, MergePlan, TensorPlan, delta_bound, parse_dtype
from .merge_params import stream_param
from .merge_plan import open_adapter, open_base, plan_merge
from .reader import CHUNK_ELEMENTS, TensorReader
from .outputs import check_output, support_files
from .shards import ShardPlan, plan_shards
from .tokenizer_files import with_src_tokenizer
from .view import Checkpoint
from .writer import CheckpointWriter

__all__ = ["merge", "plan_merge", "MergeReport", "MergeError", "MergePlan", "TensorPlan", "TensorReader", "parse_dtype", "open_base", "open_adapter"]


# --------------------------------------------------------------------------------------------------------------
# Execution


@dataclass
class MergeReport:
    """What a merge wrote, and where its time went."""

    out: Path
    base: Path
    src: Path
    counts: dict[str, int]
    untied: bool
    added: list[str]
    files: list[str]
    bytes_written: int
    copied_files: list[str]
    skipped: list[str]
    notes: list[str]
    seconds: dict[str, float]
    device: str = "cpu"  # where the LoRA/DoRA products ran

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        for k in ("out", "base", "src"):
            d[k] = str(d[k])
        return d


class _Clock:
    def __init__(self) -> None:
        self.t: dict[str, float] = {"read": 0.0, "math": 0.0, "write": 0.0, "copy": 0.0}

    def run(self, what: str, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.t[what] += time.perf_counter() - t0


def _rows_per_chunk(shape: tuple[int, ...]) -> int:
    row = max(1, math.prod(shape[1:]))
    return max(mm.MIN_CHUNK_ROWS, CHUNK_ELEMENTS // row)


def _apply_rows(chunk: torch.Tensor, start: int, stop: int, rows: tuple[torch.Tensor, tuple[int, ...]] | None) -> torch.Tensor:
    if rows is None:
        return chunk
    values, idx = rows
    for j, i in enumerate(idx):
        if start <= i < stop:
            chunk[i - start] = values[j].to(chunk.dtype)
    return chunk


def _factors(tp: TensorPlan, ar: TensorReader, device: torch.device) -> dict[str, torch.Tensor]:
    """The tensor's LoRA factors in fp32, on the device that runs the products."""
    return {k: to_device(v, device) for k, v in tp.lora.load(ar).items()}


def _execute(plan: MergePlan, w: CheckpointWriter, clock: _Clock, progress: Callable[[int, int], None] | None,
             device: torch.device = torch.device("cpu")) -> None:
    br, ar = plan.readers["base"], plan.readers["adapter"]
    total = sum(math.prod(t.shape) * t.dtype.itemsize for t in plan.tensors)
    done = 0
    by_name = {t.name: t for t in plan.tensors}
    buffers = _Buffers()
    for spec in w.plan.order:  # the writer's order (shards, and dtype alignment inside a shard)
        tp = by_name[spec.name]
        reader = ar if tp.replaced else br
        src = tp.source
        rows = (clock.run("read", ar.whole, tp.rows[0]), tp.rows[1]) if tp.rows is not None else None
        loc = reader.location(src)
        plain = tp.lora is None and tp.bias_lora is None and rows is None
        if plain and src.dtype == tp.dtype and loc is not None:
            clock.run("copy", w.copy_range, tp.name, loc[0], loc[1], src.nbytes)
        elif tp.lora is not None and tp.lora.kind == "param":  # target_parameters: slices of experts
            factors = clock.run("read", _factors, tp, ar, device)
            w.begin(tp.name)
            for chunk in stream_param(tp, reader, factors):
                _finite_or_fail(tp, chunk)
                clock.run("write", w.write_chunk, chunk)
            w.end()
        elif len(tp.shape) >= 2 and tp.bias_lora is None and (tp.lora is None or _by_rows(tp.lora)):
            factors = clock.run("read", _factors, tp, ar, device) if tp.lora is not None else None
            w.begin(tp.name)
            for chunk in _stream(tp, reader, rows, factors, clock, buffers):
                clock.run("write", w.write_chunk, chunk)
            w.end()
        else:
            t = clock.run("read", reader.whole, src)
            factors = clock.run("read", _factors, tp, ar, device) if tp.lora is not None else None
            bias = clock.run("read", ar.whole, tp.bias_lora.entry).float() if tp.bias_lora is not None else None
            t0 = time.perf_counter()
            t = _whole(tp, t, rows, factors, bias, device)
            _finite_or_fail(tp, t)
            clock.t["math"] += time.perf_counter() - t0
            clock.run("write", w.write, tp.name, t)
        done += tp.dtype.itemsize * math.prod(tp.shape)
        if progress is not None:
            progress(done, total)


def _by_rows(op) -> bool:
    """Can this LoRA/DoRA stream over row chunks with the whole merge's bits?"""
    if op.dora:
        return mm.dora_streams_by_rows(op.kind, op.fan_in_fan_out)
    return mm.streams_by_rows(op.kind, op.fan_in_fan_out, op.dora)


def _needs_check(tp: TensorPlan, factors: dict[str, torch.Tensor] | None) -> bool:
    """Can the merged values overflow? Not when the delta is bounded far below the dtype's range (then the
    per-chunk scan is skipped: inputs were checked finite in the plan)."""
    if not tp.changed:
        return False
    if tp.lora is None or factors is None or tp.lora.dora or tp.bias_lora is not None or not tp.dtype.is_floating_point:
        return True
    return not delta_bound(tp.lora, factors) < torch.finfo(tp.dtype).max / 4


def _finite_or_fail(tp: TensorPlan, t: torch.Tensor) -> None:
    if tp.changed and not mm.all_finite(t):
        raise CheckpointError(f"merging gave NaN/Inf in {tp.name!r} (overflow in {str(tp.dtype)[6:]}?); nothing was written")


class _Buffers:
    """Reused chunk buffers: fresh large allocations cost page faults on every chunk."""

    def __init__(self) -> None:
        self.read = torch.empty(0, dtype=torch.uint8)
        self.work = torch.empty(0, dtype=torch.float32)
        self.out = torch.empty(0, dtype=torch.uint8)

    def get(self, elems: int, read_bytes: int, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.read.numel() < read_bytes:
            self.read = torch.empty(read_bytes, dtype=torch.uint8)
        if self.work.numel() < 2 * elems:
            self.work = torch.empty(2 * elems, dtype=torch.float32)
        need = elems * out_dtype.itemsize
        if self.out.numel() < need:
            self.out = torch.empty(need, dtype=torch.uint8)
        return self.read, self.work, self.out[:need].view(out_dtype)


def _stream(tp: TensorPlan, reader: TensorReader, rows, factors, clock: _Clock, buffers: _Buffers) -> Iterator[torch.Tensor]:
    n = tp.shape[0]
    op = tp.lora
    row = math.prod(tp.shape[1:])
    check = _needs_check(tp, factors)
    for start, stop in mm.row_spans(n, _rows_per_chunk(tp.shape)):
        read_buf, work, out = buffers.get((stop - start) * row, (stop - start) * row * tp.source.dtype.itemsize, tp.dtype)
        chunk = clock.run("read", reader.rows, tp.source, start, stop, read_buf)
        t0 = time.perf_counter()
        if op is not None and op.dora:
            chunk = out[: chunk.numel()].view(chunk.shape).copy_(mm.dora_rows(chunk, start, stop, factors["a"], factors["b"], factors["m"],
                                                                           op.scaling, out_dtype=tp.dtype))
        elif op is not None:
            chunk = mm.lora_rows(chunk, start, stop, factors["a"], factors["b"], op.scaling, kind=op.kind,
                                 fan_in_fan_out=op.fan_in_fan_out, out_dtype=tp.dtype, work=work, out=out)
        elif chunk.dtype != tp.dtype or rows is not None:  # never edit rows in place in a reader's (mmap'd) tensor
            chunk = out[: chunk.numel()].view(chunk.shape).copy_(chunk)
        chunk = _apply_rows(chunk, start, stop, rows)
        if check:
            _finite_or_fail(tp, chunk)
        clock.t["math"] += time.perf_counter() - t0
        yield chunk


def _whole(tp: TensorPlan, t: torch.Tensor, rows, factors, bias, device: torch.device) -> torch.Tensor:
    op = tp.lora
    if op is not None:
        a, b = factors["a"], factors["b"]
        t = to_device(t, device)  # the products run where the factors are; the result comes back
        if op.dora:
            t = mm.merge_dora(t, a, b, factors["m"], op.scaling, kind=op.kind, fan_in_fan_out=op.fan_in_fan_out, out_dtype=tp.dtype)
        else:
            t = mm.merge_lora(t, a, b, op.scaling, kind=op.kind, fan_in_fan_out=op.fan_in_fan_out, out_dtype=tp.dtype)
        t = to_cpu(t)
    if tp.bias_lora is not None:
        t = mm.merge_lora_bias(t, bias, tp.bias_lora.scaling, out_dtype=tp.dtype)
    if t.dtype != tp.dtype:
        t = t.to(tp.dtype)
    if rows is not None:
        t = mm.replace_rows(t, list(rows[1]), rows[0], out_dtype=tp.dtype)
    return t


def merge(
    src: str | Path | Checkpoint,
    base: str | Path,
    out: str | Path,
    *,
    adapter_config: str | Path | None = None,
    lora_alpha: float | None = None,
    dtype: str | torch.dtype | None = "auto",
    max_shard_size: int | str = "5GB",
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
    checksum: bool = False,
    device: str | torch.device | None = "auto",
) -> MergeReport:
    """Merge SRC (PEFT adapter dir or ``.pth`` dump) into BASE and write a loadable model dir to OUT.

    Validates everything first (nothing is written if any adapter entry does not fit), then streams.
    ``progress(done_bytes, total_bytes)`` is called after each tensor. ``device`` runs the LoRA/DoRA
    products (``auto``: CUDA when present; see :mod:`devices` for how its bits relate to the CPU's).
    """
    t_start = time.perf_counter()
    dev = resolve_device(device)
    src_path = src.path if isinstance(src, Checkpoint) else src  # an opened (e.g. filtered) adapter: merge --serve
    out = check_output(out, [src_path, base], force)
    plan = plan_merge(src, base, adapter_config=adapter_config, lora_alpha=lora_alpha, dtype=dtype)
    with plan:
        t_plan = time.perf_counter() - t_start
        shard_plan: ShardPlan = plan_shards(plan.specs(), max_shard_size)
        files, skipped = support_files(plan.base.path) if plan.base.path.is_dir() else ([], [])
        vocab_notes: list[str] = []
        if plan.vocab is not None:  # new tokens: the tokenizer that added them travels with the rows
            files, vocab_notes = with_src_tokenizer(files, src, plan.vocab.base_rows, plan.vocab.rows)
        rewrite_config = plan.config is not None and plan.config != plan.base.config
        if rewrite_config:
            files = [f for f in files if f.name != "config.json"]  # written from the plan (tie flag, dtype)
        clock = _Clock()
        with CheckpointWriter(out, shard_plan, inputs=[src_path, base], force=force, checksum=checksum) as w:
            _execute(plan, w, clock, progress, dev)
            for f in files:
                w.copy_file(f)
            if rewrite_config:
                w.write_json("config.json", plan.config)
            t0 = time.perf_counter()
            w.commit()
            t_commit = time.perf_counter() - t0
        seconds = {"plan": t_plan, **clock.t, "commit": t_commit, "total": time.perf_counter() - t_start}
        return MergeReport(
            out=out,
            base=plan.base.path,
            src=plan.adapter.path,
            counts=plan.counts(),
            untied=plan.untie,
            added=[t.name for t in plan.tensors if t.added],
            files=w.files_written,
            bytes_written=w.bytes_written,
            copied_files=[f.name for f in files],
            skipped=skipped,
            notes=plan.notes + vocab_notes + ([] if plan.config is not None else ["the base has no config.json: OUT holds weights only"]),
            seconds={k: round(v, 4) for k, v in seconds.items()},
            device=str(dev),
        )

