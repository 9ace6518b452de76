"""The LoRA merge arithmetic, as pure tensor functions, bit-identical to PEFT 0.21.2's ``merge_and_unload``.

The rule PEFT follows on CPU (and this module reproduces): adapter factors are upcast to fp32 (PEFT's
``autocast_adapter_dtype``), the delta is computed in fp32, added to the base weight in fp32 and rounded
once to the output dtype. The one exception is PEFT's own: a plain (non-DoRA) embedding LoRA rounds the
delta to the weight dtype *before* adding it (``weight += delta.to(weight.dtype)``); we do the same so a
bf16 merge matches PEFT to the bit.

Kinds of layer, decided by the caller from the entries and the base shape:

* ``linear``    nn.Linear ``W (out, in)``, or transformers ``Conv1D`` ``W (in, out)`` with ``fan_in_fan_out``
* ``embedding`` nn.Embedding ``W (vocab, dim)`` with ``lora_embedding_A (r, vocab)``, ``lora_embedding_B (dim, r)``
* ``conv``      Conv1d/2d/3d (groups=1) with ``lora_A (r, in, *k)``, ``lora_B (out, r, 1, ...)``
* ``param``     a raw parameter (PEFT ``target_parameters``, ``lora.ParamWrapper``): fused MoE experts
  ``W (E, out, in)`` with ``lora_A (r·E, in)``, ``lora_B (out, r·E)``, or a 2-D weight (the router). PEFT
  rounds this delta to the weight dtype before adding it, like the embedding's.

Row-chunked variants (:func:`lora_rows`) let the merge stream a large tensor through a small buffer; a
chunk of at least :data:`MIN_CHUNK_ROWS` rows gives the same bits as the whole matrix product.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

__all__ = [
    "Kind",
    "all_finite",
    "MIN_CHUNK_ROWS",
    "fan_in_fan_out_from_shape",
    "lora_delta",
    "embedding_delta",
    "conv_delta",
    "delta_weight",
    "merge_lora",
    "merge_dora",
    "merge_lora_bias",
    "replace_rows",
    "lora_rows",
    "param_delta",
    "merge_param",
    "row_spans",
    "streams_by_rows",
    "dora_streams_by_rows",
    "dora_rows",
]

Kind = Literal["linear", "embedding", "conv", "param"]

# Matrix products over at least this many rows use the same BLAS kernel as the whole product (measured:
# single rows fall back to gemv and round differently). Chunk boundaries never leave fewer rows than this.
MIN_CHUNK_ROWS = 64


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()


def fan_in_fan_out_from_shape(
    weight_shape: tuple[int, ...], lora_a_shape: tuple[int, ...], lora_b_shape: tuple[int, ...], hint: bool = False
) -> bool | None:
    """Is the base a transformers ``Conv1D`` (weight stored ``(in, out)``)? Decided from the shapes.

    ``W (out, in)`` -> False, ``W (in, out)`` -> True, a square weight is ambiguous and takes ``hint``
    (the config's ``fan_in_fan_out``). None when the shapes fit neither orientation.
    """
    if len(weight_shape) != 2 or len(lora_a_shape) != 2 or len(lora_b_shape) != 2:
        return None
    out_f, in_f = lora_b_shape[0], lora_a_shape[1]
    plain, transposed = tuple(weight_shape) == (out_f, in_f), tuple(weight_shape) == (in_f, out_f)
    if plain and transposed:
        return bool(hint)
    if plain:
        return False
    if transposed:
        return True
    return None


def lora_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, fan_in_fan_out: bool = False) -> torch.Tensor:
    """Linear / Conv1D: ``transpose(B @ A, fan_in_fan_out) * s`` in fp32 (PEFT ``lora.Linear.get_delta_weight``)."""
    delta = _f32(lora_b) @ _f32(lora_a)
    if fan_in_fan_out:
        delta = delta.T
    return delta * scaling


def embedding_delta(emb_a: torch.Tensor, emb_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """Embedding: ``(B_e @ A_e).T * s`` in fp32, shape ``(vocab, dim)`` (PEFT ``lora.Embedding.get_delta_weight``)."""
    return (_f32(emb_b) @ _f32(emb_a)).T * scaling


def conv_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, weight_shape: tuple[int, ...]) -> torch.Tensor:
    """ConvNd (groups=1): ``ΔW[o, i, ...] = s Σ_r B[o, r] A[r, i, ...]`` in fp32.

    Same operations as PEFT (``_ConvNd.get_delta_weight``) so the bits match: a squeeze-matmul for 2-D 1×1
    kernels, a convolution of A by B otherwise. PEFT 0.21.2 also takes the 1×1 branch for Conv3d kernels
    ``(1, 1, k)`` and crashes there (peft#3768); those go through the convolution here, which is correct.
    """
    a, b = _f32(lora_a), _f32(lora_b)
    nd = len(weight_shape) - 2
    if nd == 2 and tuple(weight_shape[2:4]) == (1, 1):
        return (b.squeeze(3).squeeze(2) @ a.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3) * scaling
    conv_fn = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}.get(nd)
    if conv_fn is None:
        raise ValueError(f"conv LoRA on a weight of shape {tuple(weight_shape)} (expected 3-5 dims)")
    return conv_fn(a.transpose(0, 1), b).transpose(0, 1) * scaling


def param_delta(
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    num_experts: int,
    *,
    start: int = 0,
    stop: int | None = None,
    in_out: bool = False,
) -> torch.Tensor:
    """ParamWrapper: the fp32 delta of experts ``start:stop`` (PEFT ``ParamWrapper.get_delta_weight``).

    ``lora_A (r·E, in)`` is split expert-major (row ``e·r + k``), ``lora_B (out, r·E)`` rank-major (column
    ``k·E + e``), exactly as PEFT reshapes them. Result ``(stop-start, out, in)``, or ``(.., in, out)`` with
    ``in_out`` (a module PEFT sees as ``is_transposed``). ``num_experts == 1``: a 2-D weight, ``B @ A * s``.
    Each expert's product is independent, so a slice of experts has the same bits as the whole.
    """
    a, b = _f32(lora_a), _f32(lora_b)
    if num_experts == 1:
        return (b @ a) * scaling
    stop = num_experts if stop is None else stop
    a3 = a.reshape(num_experts, -1, a.shape[-1])[start:stop]
    b3 = b.reshape(b.shape[0], -1, num_experts)[:, :, start:stop]
    spec = "o r e, e r i -> e i o" if in_out else "o r e, e r i -> e o i"
    return torch.einsum(spec, b3, a3).mul_(scaling)  # in place: the same bits as PEFT's "* scaling"


def merge_param(weight: torch.Tensor, delta: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``W + ΔW`` as PEFT's ParamWrapper merges: ``param.data += delta.to(param.dtype)`` (delta rounded first
    unless fp32). ``delta`` is in W's orientation (transpose it first for a hub-layout file)."""
    out_dtype = out_dtype or weight.dtype
    if out_dtype != torch.float32:
        return delta.to(out_dtype).add_(weight.to(out_dtype))
    return delta.add(_f32(weight)) if not delta.is_contiguous() else delta.add_(_f32(weight))


def all_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf. ``aminmax`` propagates both and is ~15x faster than ``isfinite().all()`` on bf16."""
    if t.numel() == 0 or not (t.dtype.is_floating_point or t.is_complex()):
        return True
    if t.is_complex():  # no ordering: check elementwise
        return bool(torch.isfinite(t).all())
    lo, hi = torch.aminmax(t.reshape(-1))
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def delta_weight(
    kind: Kind,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    weight_shape: tuple[int, ...],
    fan_in_fan_out: bool = False,
) -> torch.Tensor:
    """The fp32 delta of one LoRA pair, in the base weight's own orientation and shape."""
    if kind == "linear":
        return lora_delta(lora_a, lora_b, scaling, fan_in_fan_out)
    if kind == "embedding":
        return embedding_delta(lora_a, lora_b, scaling)
    if kind == "conv":
        return conv_delta(lora_a, lora_b, scaling, weight_shape)
    if kind == "param":
        return param_delta(lora_a, lora_b, scaling, weight_shape[0] if len(weight_shape) == 3 else 1)
    raise ValueError(f"unknown layer kind {kind!r}")


def merge_lora(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    *,
    kind: Kind = "linear",
    fan_in_fan_out: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``W + ΔW`` rounded once to ``out_dtype`` (default: W's dtype). A new tensor; ``weight`` is not touched."""
    out_dtype = out_dtype or weight.dtype
    delta = delta_weight(kind, lora_a, lora_b, scaling, tuple(weight.shape), fan_in_fan_out)
    if kind == "embedding" and out_dtype != torch.float32:
        # PEFT: weight.data += delta.to(weight.dtype) -- the delta is rounded first, then the sum
        delta = delta.to(out_dtype)
    merged = delta.add_(_f32(weight)) if delta.is_contiguous() else delta + weight
    return merged.to(out_dtype)


def merge_dora(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    *,
    kind: Kind = "linear",
    fan_in_fan_out: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """DoRA: ``W' = m / ||W + ΔW|| * (W + ΔW)``, the norm taken from the unmerged base weight as PEFT does.

    Linear: norm per output feature, ``m (out,)``; Embedding: per embedding dimension (column), ``m (dim,)``;
    ConvNd: per output channel, ``m (1, out, 1, ...)``.
    """
    out_dtype = out_dtype or weight.dtype
    delta = delta_weight(kind, lora_a, lora_b, scaling, tuple(weight.shape), fan_in_fan_out)
    mag = _f32(magnitude)
    # The same operation sequence as PEFT's DoRA variants (get_weight_norm with scaling=1), for the same bits.
    if kind == "linear":
        w_t, d_t = (weight.T, delta.T) if fan_in_fan_out else (weight, delta)
        norm = torch.linalg.norm(w_t + d_t, dim=1)
        factor = (mag / norm).view(-1, 1)
        if fan_in_fan_out:
            factor = factor.T
    elif kind == "embedding":
        norm = torch.linalg.norm(weight.T + delta.T, dim=1)
        factor = (mag / norm).view(1, -1)
    elif kind == "conv":
        combined = weight + delta
        norm = combined.norm(p=2, dim=tuple(range(1, combined.dim())), keepdim=True).transpose(1, 0)
        factor = (mag / norm).view((-1,) + (1,) * (combined.dim() - 1))
    else:
        raise ValueError(f"unknown layer kind {kind!r}")
    return (factor * (weight + delta)).to(out_dtype)


def merge_lora_bias(bias: torch.Tensor, lora_bias: torch.Tensor, scaling: float, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``lora_bias``: ``b + lora_B.bias * s``, in fp32, rounded once."""
    out_dtype = out_dtype or bias.dtype
    return (_f32(lora_bias) * scaling).add_(bias).to(out_dtype)


def replace_rows(weight: torch.Tensor, indices: list[int] | torch.Tensor, rows: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Trainable tokens: ``W.index_copy(0, indices, rows)`` (rows are the new values, not differences).

    Like PEFT the rows are cast to the weight's dtype first; the result is then cast to ``out_dtype``.
    """
    out_dtype = out_dtype or weight.dtype
    index = torch.as_tensor(indices, dtype=torch.long)
    merged = weight.index_copy(0, index, rows.to(weight.dtype))
    return merged.to(out_dtype)


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
    """Can this merge run over row chunks of W (bit-identical to the whole-tensor merge)?

    Plain LoRA on a Linear, a Conv1D or an Embedding: each output row depends on one row of B (Linear) or
    one column of A (Conv1D, Embedding). DoRA needs a norm over columns for some kinds, conv is small: whole.
    """
    return not dora and kind in ("linear", "embedding")


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

    Equal to ``merge_lora(W, ...)[start:stop]`` bit for bit when the span has >= :data:`MIN_CHUNK_ROWS`
    rows or is the whole tensor (see :func:`row_spans`). ``work`` (fp32, at least twice the chunk's size) and
    ``out`` (``out_dtype``, the chunk's size) are flat buffers reused instead of allocating: the streaming
    merge's hot loop.
    """
    out_dtype = out_dtype or weight_rows.dtype
    a, b = _f32(lora_a), _f32(lora_b)
    rows = stop - start
    shape = (rows,) + tuple(weight_rows.shape[1:])
    n = rows * (math.prod(shape[1:]) if len(shape) > 1 else 1)
    res = out.view(-1)[:n].view(shape) if out is not None else torch.empty(shape, dtype=out_dtype)
    if a.device != weight_rows.device:  # factors on an accelerator (--device cuda): the same steps there
        return res.copy_(_rows_on(a.device, weight_rows, start, stop, a, b, scaling, kind, fan_in_fan_out, out_dtype))
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
    if kind == "linear" and not fan_in_fan_out:
        return torch.mm(b[start:stop], a).mul_(scaling).add_(w.float()).to(out_dtype)
    delta = torch.mm(b, a[:, start:stop]).mul_(scaling).T
    if kind == "embedding" and out_dtype != torch.float32:
        return delta.to(out_dtype).add_(w)
    return torch.add(delta, w).to(out_dtype)


def dora_streams_by_rows(kind: Kind, fan_in_fan_out: bool) -> bool:
    """DoRA on a plain Linear: the weight norm is per output row, so row chunks give the whole merge's bits
    (each row's norm is its own reduction). Conv1D and Embedding take the norm across rows: whole."""
    return kind == "linear" and not fan_in_fan_out


def dora_rows(weight_rows: torch.Tensor, start: int, stop: int, lora_a: torch.Tensor, lora_b: torch.Tensor,
              magnitude: torch.Tensor, scaling: float, *, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rows ``start:stop`` of :func:`merge_dora` on a Linear (``magnitude (out,)``), with :func:`merge_dora`'s
    operation sequence; the chunk rule of :func:`row_spans` applies. On the factors' device."""
    out_dtype = out_dtype or weight_rows.dtype
    w = weight_rows.to(lora_a.device)
    delta = (_f32(lora_b)[start:stop] @ _f32(lora_a)) * scaling
    norm = torch.linalg.norm(w + delta, dim=1)
    factor = (_f32(magnitude)[start:stop] / norm).view(-1, 1)
    return (factor * (w + delta)).to(out_dtype)
