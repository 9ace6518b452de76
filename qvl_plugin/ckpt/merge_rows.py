"""Row-chunked LoRA/DoRA merges: rows ``start:stop`` (dim 0) of :mod:`merge_math`'s whole-tensor results.

The streaming merge reads a large base tensor in spans from :func:`row_spans` and merges each span through a
buffer of its size, instead of holding the tensor and its fp32 delta whole (about 4x its memory).

Bit for bit equal to the whole merge (``merge_lora(W, ...)[start:stop]``, ``merge_dora(W, ...)[start:stop]``),
given spans of at least :data:`MIN_CHUNK_ROWS` rows (or the whole tensor):

* plain LoRA (:func:`lora_rows`) on a Linear (rows of B), a Conv1D or an Embedding (columns of A), a ConvNd
  (output channels: rows of B, the same convolution or 1x1 squeeze-matmul as :func:`conv_delta`);
* DoRA (:func:`dora_rows`) on a Linear and a ConvNd: the weight norm is per output row/channel, each its
  own reduction.

Two passes, within a tolerance: DoRA on an Embedding (norm per column of ``W (vocab, dim)``) and on a
Conv1D (``W (in, out)``, norm per output feature = per column). The norm runs across all rows, so pass 1
(:func:`dora_norm_rows` over every span, then :func:`dora_norm_finish`) computes the column norms of
``W + ΔW`` and pass 2 (:func:`dora_rows` with ``norms=``) merges each span. torch's fp32 column reduction
(``linalg.norm(dim=1)`` of the transposed view) follows no order a row-chunked sum reproduces (measured: a
sequential fp32 sum, with or without FMA, lane-interleaved sums and float64 all differ from it in some
columns), so pass 1 accumulates the sum of squares in float64: the norm is the correctly rounded fp32 norm
of the fp32 ``W + ΔW`` (same values as the whole merge), and the difference from :func:`merge_dora` is
that reduction's own fp32 rounding error. Measured (CPU, torch 2.13, random factors, shapes up to
``(151936, 64)``): a bf16 or fp16 output differs from :func:`merge_dora` (and PEFT) by at most 1 ulp in a
few elements; an fp32 output by the norms' relative difference, which grows with the rows summed: at most
0.8e-6 (12 ulp) at 1k rows, 2e-6 at 5k, 4.5e-6 at 32k, 2.4e-5 (398 ulp) at 152k; :data:`DORA_TWO_PASS_REL_TOL`
(1e-4) is the bound the tests hold it to. Measured, not a proof: the whole merge's fp32 sum has no tight bound.
"""

from __future__ import annotations

import math

import torch

from .merge_math import MIN_CHUNK_ROWS, Kind, _f32, conv_delta

__all__ = [
    "row_spans",
    "streams_by_rows",
    "lora_rows",
    "dora_streams_by_rows",
    "dora_needs_norm_pass",
    "dora_norm_rows",
    "dora_norm_finish",
    "dora_rows",
    "DORA_TWO_PASS_REL_TOL",
]

# Relative difference allowed between a two-pass (Embedding, Conv1D) DoRA merge and the whole one, fp32 output
# (bf16/fp16: 1 ulp): the whole merge's fp32 column sums round as they go; measured at most 2.4e-5 (151936 rows).
DORA_TWO_PASS_REL_TOL = 1e-4


def row_spans(n_rows: int, chunk_rows: int) -> list[tuple[int, int]]:
    """Split ``range(n_rows)`` into spans of about ``chunk_rows``; no span (but a lone one) is shorter than
    :data:`MIN_CHUNK_ROWS`, so each chunked product rounds exactly as the whole one."""
    chunk_rows = max(chunk_rows, MIN_CHUNK_ROWS)
    spans, i = [], 0
    while i < n_rows:
        j = min(n_rows, i + chunk_rows)
        if n_rows - j < MIN_CHUNK_ROWS:
            j = n_rows
        spans.append((i, j))
        i = j
    return spans


def streams_by_rows(kind: Kind, fan_in_fan_out: bool, dora: bool) -> bool:
    """Can this plain LoRA merge run over row chunks of W, bit-identical to the whole-tensor merge?

    Linear, Conv1D, Embedding, ConvNd: each output row depends on one row of B (Linear, conv output channel)
    or one column of A (Conv1D, Embedding). False for DoRA: ask :func:`dora_streams_by_rows` (one pass) and
    :func:`dora_needs_norm_pass` (two passes).
    """
    return not dora and kind in ("linear", "embedding", "conv")


def _conv_rows_delta(a: torch.Tensor, b: torch.Tensor, scaling: float, start: int, stop: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Output channels ``start:stop`` of :func:`conv_delta`: the same convolution (or 1x1 squeeze-matmul) with
    B's rows for those channels; fp32, ``(stop-start, in, *k)``."""
    return conv_delta(a, b[start:stop], scaling, (stop - start,) + tuple(shape[1:]))


def lora_rows(
    weight_rows: torch.Tensor,
    start: int,
    stop: int,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    *,
    kind: Kind = "linear",
    fan_in_fan_out: bool = False,
    out_dtype: torch.dtype | None = None,
    work: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows ``start:stop`` of :func:`merge_lora`'s result, given those rows of W (``lora_a``/``lora_b`` fp32).

    Kinds ``linear`` (W ``(rows, in)`` or, Conv1D, ``(rows of in, out)``), ``embedding`` and ``conv``
    (``weight_rows (rows, in, *k)``, rows = output channels). Equal to ``merge_lora(W, ...)[start:stop]`` bit
    for bit when the span has >= :data:`MIN_CHUNK_ROWS` rows or is the whole tensor (see :func:`row_spans`).
    ``work`` (fp32, at least twice the chunk's size) and ``out`` (``out_dtype``, the chunk's size) are flat
    buffers reused instead of allocating: the streaming merge's hot loop.
    """
    out_dtype = out_dtype or weight_rows.dtype
    a, b = _f32(lora_a), _f32(lora_b)
    rows = stop - start
    shape = (rows,) + tuple(weight_rows.shape[1:])
    n = rows * (math.prod(shape[1:]) if len(shape) > 1 else 1)
    res = out.view(-1)[:n].view(shape) if out is not None else torch.empty(shape, dtype=out_dtype)
    if a.device != weight_rows.device:  # factors on an accelerator (--device cuda): the same steps there
        return res.copy_(_rows_on(a.device, weight_rows, start, stop, a, b, scaling, kind, fan_in_fan_out, out_dtype))
    if kind == "conv":
        delta = _conv_rows_delta(a, b, scaling, start, stop, shape)  # fp32, a fresh chunk-sized tensor
        w32 = work.view(-1)[:n].view(shape).copy_(weight_rows) if work is not None else weight_rows.float()
        return res.copy_(delta.add_(w32))
    if kind == "linear" and not fan_in_fan_out:
        delta = torch.mm(b[start:stop], a, out=work.view(-1)[:n].view(shape)) if work is not None else torch.mm(b[start:stop], a)
        delta.mul_(scaling)
        # W + delta in fp32, rounded once on store (PEFT's ``weight.data += delta``). W is widened first: torch's
        # mixed-dtype add is not vectorised and costs ~3x the two same-dtype passes.
        w32 = work.view(-1)[n: 2 * n].view(shape).copy_(weight_rows) if work is not None else weight_rows.float()
        delta.add_(w32)
        return res.copy_(delta)
    # (B @ A[:, rows]).T: Conv1D (W is (in, out)) and Embedding (W is (vocab, dim))
    t_shape = (shape[1], rows)
    delta = torch.mm(b, a[:, start:stop], out=work.view(-1)[:n].view(t_shape)) if work is not None else torch.mm(b, a[:, start:stop])
    delta = delta.mul_(scaling).T
    if kind == "embedding" and out_dtype != torch.float32:
        res.copy_(delta)  # PEFT rounds the embedding delta to the weight dtype first ...
        res.add_(weight_rows)  # ... then adds in that dtype
        return res
    return torch.add(delta, weight_rows, out=res)


def _rows_on(device: torch.device, weight_rows: torch.Tensor, start: int, stop: int, a: torch.Tensor, b: torch.Tensor,
             scaling: float, kind: Kind, fan_in_fan_out: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """:func:`lora_rows` with the factors on ``device``: the chunk goes there, the same operation sequence
    runs there (fp32 delta, one rounding; the embedding's delta rounded first), the result is on ``device``."""
    w = weight_rows.to(device)
    if kind == "conv":
        return _conv_rows_delta(a, b, scaling, start, stop, tuple(w.shape)).add_(w.float()).to(out_dtype)
    if kind == "linear" and not fan_in_fan_out:
        return torch.mm(b[start:stop], a).mul_(scaling).add_(w.float()).to(out_dtype)
    delta = torch.mm(b, a[:, start:stop]).mul_(scaling).T
    if kind == "embedding" and out_dtype != torch.float32:
        return delta.to(out_dtype).add_(w)
    return torch.add(delta, w).to(out_dtype)


# --------------------------------------------------------------------------------------------------------------
# DoRA


def dora_streams_by_rows(kind: Kind, fan_in_fan_out: bool) -> bool:
    """One pass over row chunks, the whole merge's bits: DoRA on a plain Linear (norm per output row) and on a
    ConvNd (norm per output channel, dim 0). Embedding and Conv1D take the norm across rows: they need the
    norm pass first (:func:`dora_needs_norm_pass`), and are not counted here."""
    return (kind == "linear" and not fan_in_fan_out) or kind == "conv"


def dora_needs_norm_pass(kind: Kind, fan_in_fan_out: bool) -> bool:
    """DoRA whose norm runs across rows (per column of W): an Embedding, a Conv1D (Linear with
    ``fan_in_fan_out``). Streams in two passes: :func:`dora_norm_rows` over all spans, :func:`dora_norm_finish`,
    then :func:`dora_rows` with ``norms=``; within :data:`DORA_TWO_PASS_REL_TOL` of the whole merge."""
    return kind == "embedding" or (kind == "linear" and fan_in_fan_out)


def _kind_of(weight_rows: torch.Tensor, kind: Kind | None) -> Kind:
    # No kind given (the streaming merge's one-pass call): a weight of 3+ dims under DoRA is a conv.
    return kind if kind is not None else ("conv" if weight_rows.dim() > 2 else "linear")


def _combined_rows(w: torch.Tensor, start: int, stop: int, a: torch.Tensor, b: torch.Tensor, scaling: float,
                   kind: Kind, fan_in_fan_out: bool) -> torch.Tensor:
    """Rows ``start:stop`` of ``W + ΔW`` in fp32, the same values as :func:`merge_dora`'s (W on the factors' device)."""
    if kind == "conv":
        delta = _conv_rows_delta(a, b, scaling, start, stop, tuple(w.shape))
    elif kind == "linear" and not fan_in_fan_out:
        delta = (b[start:stop] @ a) * scaling
    elif dora_needs_norm_pass(kind, fan_in_fan_out):  # (B @ A[:, rows]).T: the rows of W are columns of A
        delta = (b @ a[:, start:stop]).T * scaling
    else:
        raise ValueError(f"DoRA on a layer of kind {kind!r}")
    return w + delta


def dora_norm_rows(acc: torch.Tensor | None, weight_rows: torch.Tensor, start: int, stop: int, lora_a: torch.Tensor,
                   lora_b: torch.Tensor, scaling: float, *, kind: Kind, fan_in_fan_out: bool = False) -> torch.Tensor:
    """Pass 1 of a two-pass DoRA (:func:`dora_needs_norm_pass`): add the squares of rows ``start:stop`` of
    ``W + ΔW`` (fp32, :func:`merge_dora`'s values) to the per-column sums ``acc`` (float64, ``(cols,)``; None
    to start) and return them. Spans in any order, each row once; :func:`dora_norm_finish` gives the norms.
    On the factors' device (the chunk goes there)."""
    if not dora_needs_norm_pass(kind, fan_in_fan_out):
        raise ValueError(f"DoRA on {kind!r} (fan_in_fan_out={fan_in_fan_out}) takes its norm per row: no norm pass")
    a, b = _f32(lora_a), _f32(lora_b)
    combined = _combined_rows(weight_rows.to(a.device), start, stop, a, b, scaling, kind, fan_in_fan_out).double()
    part = combined.mul_(combined).sum(dim=0)
    return part if acc is None else acc.add_(part)


def dora_norm_finish(acc: torch.Tensor) -> torch.Tensor:
    """The per-column norms ``||W + ΔW||`` (fp32, ``(cols,)``) from :func:`dora_norm_rows`' sums of squares:
    the square root in float64, rounded once to fp32."""
    return acc.sqrt().float()


def dora_rows(weight_rows: torch.Tensor, start: int, stop: int, lora_a: torch.Tensor, lora_b: torch.Tensor,
              magnitude: torch.Tensor, scaling: float, *, kind: Kind | None = None, fan_in_fan_out: bool = False,
              out_dtype: torch.dtype | None = None, norms: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``start:stop`` of :func:`merge_dora`, with its operation sequence. On the factors' device.

    * Linear (``magnitude (out,)``) and ConvNd (``weight_rows (rows, in, *k)``, ``magnitude (1, out, 1, ...)``
      as PEFT stores it): the norm is per row, the result the whole merge's bits (spans of
      :func:`row_spans`). ``kind`` None: ``conv`` for a weight of 3+ dims, else ``linear``.
    * Embedding, Conv1D (``fan_in_fan_out``; ``magnitude (dim,)`` / ``(out,)``): ``norms`` from
      :func:`dora_norm_finish` over all rows is required; within :data:`DORA_TWO_PASS_REL_TOL` (fp32 output),
      1 ulp (bf16/fp16), of the whole merge.
    """
    out_dtype = out_dtype or weight_rows.dtype
    kind = _kind_of(weight_rows, kind)
    a, b = _f32(lora_a), _f32(lora_b)
    w = weight_rows.to(a.device)
    mag = _f32(magnitude).to(a.device)
    combined = _combined_rows(w, start, stop, a, b, scaling, kind, fan_in_fan_out)
    if dora_needs_norm_pass(kind, fan_in_fan_out):
        if norms is None:
            raise ValueError(f"DoRA on {kind!r}: the norm runs across rows; pass norms= from dora_norm_finish")
        factor = (mag.reshape(-1) / norms.to(a.device)).view(1, -1)
    elif kind == "conv":
        # merge_dora: norm over (in, *k) per output channel, as PEFT (keepdim, then transposed to (1, out, 1, ...))
        norm = combined.norm(p=2, dim=tuple(range(1, combined.dim())), keepdim=True).transpose(1, 0)
        m = mag.reshape(-1)[start:stop].view(norm.shape)
        factor = (m / norm).view((-1,) + (1,) * (combined.dim() - 1))
    else:
        norm = torch.linalg.norm(combined, dim=1)
        factor = (mag[start:stop] / norm).view(-1, 1)
    return (factor * combined).to(out_dtype)
