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

Row-chunked variants (:mod:`merge_rows`, which builds on this module: :func:`row_spans`, :func:`lora_rows`,
:func:`dora_rows`, ...) let the merge stream a large tensor through a small buffer; a chunk of at least
:data:`MIN_CHUNK_ROWS` rows gives the same bits as the whole matrix product. What streams:

* one pass, the whole merge's bits: plain LoRA on every kind but ``param`` (which streams by experts,
  :func:`param_delta`); DoRA on a Linear and on a ConvNd (norm per output row / channel);
* two passes (column norms first, :func:`dora_norm_rows`), within :data:`DORA_TWO_PASS_REL_TOL` of the whole
  merge (fp32 output; 1 ulp for bf16/fp16): DoRA on an Embedding and on a Conv1D, whose norm runs across rows.
"""

from __future__ import annotations

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
    "param_delta",
    "merge_param",
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
