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
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..errors import CheckpointError
from . import merge_math as mm
from . import merge_rows as mr
from .devices import resolve_device, to_cpu, to_device
from .merge_ops import MergeError, MergePlan, TensorPlan, delta_bound, parse_dtype
from .merge_params import stream_param
from .merge_plan import open_adapter, open_base, plan_merge
from .reader import CHUNK_ELEMENTS, TensorReader
from .outputs import check_output, support_files
from .shards import ShardPlan, plan_shards
from .sink import takes_o_direct
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
    direct_io: bool = False  # the shards went past the page cache (O_DIRECT)
    writer_thread: bool = False  # writes overlapped the math (see writer_thread_default)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        for k in ("out", "base", "src"):
            d[k] = str(d[k])
        return d


class _Clock:
    """Seconds per part. ``read``/``math``/``wait`` run on the calling thread, ``write``/``copy`` on the writer's:
    the parts overlap, so they can add up to more than the wall time."""

    def __init__(self) -> None:
        self.t: dict[str, float] = {"read": 0.0, "math": 0.0, "write": 0.0, "copy": 0.0, "wait": 0.0}

    def run(self, what: str, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.t[what] += time.perf_counter() - t0


def writer_thread_default(direct: bool) -> bool:
    """Overlap writing with the math where it pays (measured, README): with direct I/O the writes are waits on
    the device and the thread is 0.99-1.34x as fast even on 2 cores; through the page cache on 2 cores both
    are CPU work against the BLAS threads (0.73-0.94x), so there only from 4 usable cores up.
    ``QVL_MERGE_WRITER=thread|inline`` decides instead (benchmarks)."""
    forced = os.environ.get("QVL_MERGE_WRITER", "").strip().lower()
    if forced in ("thread", "inline"):
        return forced == "thread"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores >= 4 or (direct and cores >= 2)


class _Pipeline:
    """The writer's calls run on one background thread, in the order they are handed over, while this thread
    reads and computes the next chunks: reading + LoRA math overlap with writing + kernel copies (a writer
    waiting on the disk leaves the cores to the math). ``threaded=False`` runs each call at hand-over, in
    this thread (the same order, buffers and errors).

    Chunks live in :data:`SLOTS` rotating buffer sets; a set is reused only after its last write finished
    (bounded memory: at most ``SLOTS`` chunks in flight, besides whole tensors already in memory). After the
    first failure on the writer's thread the queued calls are skipped, and that error is raised here at the
    next hand-over or wait.
    """

    SLOTS = 3

    def __init__(self, w: CheckpointWriter, clock: _Clock, threaded: bool = True) -> None:
        self.w, self.clock = w, clock
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qvl-merge-write") if threaded else None
        self.pending: deque[Future] = deque()
        first = _Buffers()
        self.slots = [first] + [_Buffers(shared=first) for _ in range(self.SLOTS - 1)]
        self.slot_done: list[Future | None] = [None] * self.SLOTS
        self.turn = 0
        self.error: BaseException | None = None

    def _call(self, what: str, fn, *args) -> None:  # on the writer's thread
        if self.error is None:
            try:
                self.clock.run(what, fn, *args)
            except BaseException as e:
                self.error = e

    def _wait(self, f: Future) -> None:
        self.clock.run("wait", f.result)
        if self.error is not None:
            raise self.error

    def submit(self, what: str, fn, *args) -> Future | None:
        """Hand over one writer call: queued (its future), or run now when inline (None: nothing to wait for)."""
        while self.pending and self.pending[0].done():
            self.pending.popleft()
        if self.pool is None:
            self._call(what, fn, *args)
        if self.error is not None:
            raise self.error
        if self.pool is None:
            return None
        f = self.pool.submit(self._call, what, fn, *args)
        self.pending.append(f)
        return f

    def buffers(self) -> tuple[int, "_Buffers"]:
        """The next free buffer set (waits for the write that still reads it)."""
        i, self.turn = self.turn, (self.turn + 1) % self.SLOTS
        if self.slot_done[i] is not None:
            self._wait(self.slot_done[i])
            self.slot_done[i] = None
        return i, self.slots[i]

    def write_chunk(self, slot: int, chunk: torch.Tensor) -> None:
        self.slot_done[slot] = self.submit("write", self.w.write_chunk, chunk)

    def write_fresh(self, fn, *args) -> None:
        """Hand over a write of a freshly computed tensor; it takes a slot too, so at most ``SLOTS`` of them
        wait in memory for the writer."""
        slot, _ = self.buffers()
        self.slot_done[slot] = self.submit("write", fn, *args)

    def drain(self) -> None:
        while self.pending:
            self._wait(self.pending.popleft())

    def close(self) -> None:
        """Stop: the writer's thread finishes the call it runs; queued calls are dropped."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


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
             device: torch.device = torch.device("cpu"), threaded: bool = False) -> None:
    pipe = _Pipeline(w, clock, threaded)
    try:
        _run_plan(plan, pipe, clock, progress, device)
        pipe.drain()
    finally:
        pipe.close()


def _run_plan(plan: MergePlan, pipe: _Pipeline, clock: _Clock, progress: Callable[[int, int], None] | None,
              device: torch.device) -> None:
    br, ar = plan.readers["base"], plan.readers["adapter"]
    w = pipe.w
    total = sum(math.prod(t.shape) * t.dtype.itemsize for t in plan.tensors)
    done = 0
    by_name = {t.name: t for t in plan.tensors}
    for spec in w.plan.order:  # the writer's order (shards, and dtype alignment inside a shard)
        tp = by_name[spec.name]
        reader = ar if tp.replaced else br
        src = tp.source
        rows = (clock.run("read", ar.whole, tp.rows[0]), tp.rows[1]) if tp.rows is not None else None
        loc = reader.location(src)
        plain = tp.lora is None and tp.bias_lora is None and rows is None
        if plain and src.dtype == tp.dtype and loc is not None:
            pipe.submit("copy", w.copy_range, tp.name, loc[0], loc[1], src.nbytes)
        elif tp.lora is not None and tp.lora.kind == "param":  # target_parameters: slices of experts
            factors = clock.run("read", _factors, tp, ar, device)
            pipe.submit("write", w.begin, tp.name)
            for chunk in stream_param(tp, reader, factors):
                _finite_or_fail(tp, chunk)
                pipe.write_fresh(w.write_chunk, chunk)
            pipe.submit("write", w.end)
        elif _streams(tp):
            factors = clock.run("read", _factors, tp, ar, device) if tp.lora is not None else None
            pipe.submit("write", w.begin, tp.name)
            for slot, chunk in _stream(tp, reader, rows, factors, clock, pipe):
                pipe.write_chunk(slot, chunk)
            pipe.submit("write", w.end)
        else:
            t = clock.run("read", reader.whole, src)
            factors = clock.run("read", _factors, tp, ar, device) if tp.lora is not None else None
            bias = clock.run("read", ar.whole, tp.bias_lora.entry).float() if tp.bias_lora is not None else None
            t0 = time.perf_counter()
            t = _whole(tp, t, rows, factors, bias, device)
            _finite_or_fail(tp, t)
            clock.t["math"] += time.perf_counter() - t0
            pipe.write_fresh(w.write, tp.name, t)
        done += tp.dtype.itemsize * math.prod(tp.shape)
        if progress is not None:
            progress(done, total)


def _streams(tp: TensorPlan) -> bool:
    """Is this tensor merged in row chunks (:func:`_stream`) rather than whole?"""
    return len(tp.shape) >= 2 and tp.bias_lora is None and (tp.lora is None or _by_rows(tp.lora, tp.shape))


def _by_rows(op, shape: tuple[int, ...]) -> bool:
    """Does this LoRA/DoRA stream over row chunks? With the whole merge's bits, or (DoRA whose norm runs across
    rows: Embedding, Conv1D) in two passes when the tensor is larger than one chunk (:func:`_two_pass`)."""
    if op.dora:
        return mr.dora_streams_by_rows(op.kind, op.fan_in_fan_out) or _two_pass(op, shape)
    return mr.streams_by_rows(op.kind, op.fan_in_fan_out, op.dora)


def _two_pass(op, shape: tuple[int, ...]) -> bool:
    """A tensor small enough for one chunk merges whole (the same memory, PEFT's bits); a larger one takes two
    passes: column norms first, in float64 (within ``mr.DORA_TWO_PASS_REL_TOL``; 1 ulp of bf16/fp16)."""
    return op.dora and mr.dora_needs_norm_pass(op.kind, op.fan_in_fan_out) and math.prod(shape) > CHUNK_ELEMENTS


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
    """One chunk's reused buffers (fresh large allocations cost page faults on every chunk); the fp32 work
    buffer is the pipeline's, shared: only the computing thread uses it."""

    def __init__(self, shared: "_Buffers | None" = None) -> None:
        self.shared = shared
        self.read = torch.empty(0, dtype=torch.uint8)
        self.work = torch.empty(0, dtype=torch.float32)
        self.out = torch.empty(0, dtype=torch.uint8)

    def get(self, elems: int, read_bytes: int, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.read.numel() < read_bytes:
            self.read = torch.empty(read_bytes, dtype=torch.uint8)
        owner = self.shared or self
        if owner.work.numel() < 2 * elems:
            owner.work = torch.empty(2 * elems, dtype=torch.float32)
        need = elems * out_dtype.itemsize
        if self.out.numel() < need:
            self.out = torch.empty(need, dtype=torch.uint8)
        return self.read, owner.work, self.out[:need].view(out_dtype)


def _stream(tp: TensorPlan, reader: TensorReader, rows, factors, clock: _Clock, pipe: _Pipeline) -> Iterator[tuple[int, torch.Tensor]]:
    """The merged tensor's row chunks, each in one of the pipeline's buffer sets (yielded with its slot)."""
    n = tp.shape[0]
    op = tp.lora
    row = math.prod(tp.shape[1:])
    check = _needs_check(tp, factors)
    spans = mr.row_spans(n, _rows_per_chunk(tp.shape))
    norms = _dora_norms(tp, reader, factors, spans, clock, pipe) if op is not None and _two_pass(op, tp.shape) else None
    for start, stop in spans:
        slot, buffers = pipe.buffers()
        read_buf, work, out = buffers.get((stop - start) * row, (stop - start) * row * tp.source.dtype.itemsize, tp.dtype)
        chunk = clock.run("read", reader.rows, tp.source, start, stop, read_buf)
        t0 = time.perf_counter()
        if op is not None and op.dora:
            chunk = out[: chunk.numel()].view(chunk.shape).copy_(mr.dora_rows(chunk, start, stop, factors["a"], factors["b"], factors["m"],
                                                                           op.scaling, kind=op.kind, fan_in_fan_out=op.fan_in_fan_out,
                                                                           out_dtype=tp.dtype, norms=norms))
        elif op is not None:
            chunk = mr.lora_rows(chunk, start, stop, factors["a"], factors["b"], op.scaling, kind=op.kind,
                                 fan_in_fan_out=op.fan_in_fan_out, out_dtype=tp.dtype, work=work, out=out)
        elif chunk.dtype != tp.dtype or rows is not None:  # never edit rows in place in a reader's (mmap'd) tensor
            chunk = out[: chunk.numel()].view(chunk.shape).copy_(chunk)
        chunk = _apply_rows(chunk, start, stop, rows)
        if check:
            _finite_or_fail(tp, chunk)
        clock.t["math"] += time.perf_counter() - t0
        yield slot, chunk


def _dora_norms(tp: TensorPlan, reader: TensorReader, factors, spans, clock: _Clock, pipe: _Pipeline) -> torch.Tensor:
    """Pass 1 of a two-pass DoRA: the per-column norms of ``W + ΔW``, over the same row chunks."""
    op, acc = tp.lora, None
    row_bytes = math.prod(tp.shape[1:]) * tp.source.dtype.itemsize
    for start, stop in spans:
        _, buffers = pipe.buffers()
        read_buf = buffers.get((stop - start) * math.prod(tp.shape[1:]), (stop - start) * row_bytes, tp.dtype)[0]
        chunk = clock.run("read", reader.rows, tp.source, start, stop, read_buf)
        t0 = time.perf_counter()
        acc = mr.dora_norm_rows(acc, chunk, start, stop, factors["a"], factors["b"], op.scaling, kind=op.kind, fan_in_fan_out=op.fan_in_fan_out)
        clock.t["math"] += time.perf_counter() - t0
    return mr.dora_norm_finish(acc)


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


def _two_pass_notes(plan: MergePlan) -> list[str]:
    names = [t.name for t in plan.tensors if t.lora is not None and _streams(t) and _two_pass(t.lora, t.shape)]
    if not names:
        return []
    return [f"DoRA with norms across rows (Embedding/Conv1D) merged in two passes with float64 norms, bounded memory: within 1 ulp of "
            f"PEFT's whole-tensor merge in bf16/fp16 (relative {mr.DORA_TWO_PASS_REL_TOL:g} in fp32): {', '.join(names)}"]


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
    direct_io: bool = True,
) -> MergeReport:
    """Merge SRC (PEFT adapter dir or ``.pth`` dump) into BASE and write a loadable model dir to OUT.

    Validates everything first (nothing is written if any adapter entry does not fit), then streams.
    ``progress(done_bytes, total_bytes)`` is called as each tensor is handed to the writer. ``device`` runs the LoRA/DoRA
    products (``auto``: CUDA when present; see :mod:`devices` for how its bits relate to the CPU's).
    ``direct_io`` sends the weights to the device past the page cache where the filesystem allows
    (:mod:`sink`): one write of each byte, no cache pages to allocate, the base stays cached.
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
        with CheckpointWriter(out, shard_plan, inputs=[src_path, base], force=force, checksum=checksum, direct=direct_io) as w:
            threaded = writer_thread_default(w.direct and takes_o_direct(w.tmp))
            _execute(plan, w, clock, progress, dev, threaded)
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
            notes=plan.notes + vocab_notes + _two_pass_notes(plan) + ([] if plan.config is not None else ["the base has no config.json: OUT holds weights only"]),
            seconds={k: round(v, 4) for k, v in seconds.items()},
            device=str(dev),
            writer_thread=threaded,
            direct_io=w.direct_used,
        )

