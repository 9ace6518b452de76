"""What an adapter does to its base tensors, computed without forming out×in matrices where possible.

LoRA pairs are grouped from headers; their effects compare through r×r Gram products of the factors;
``effective_weight`` applies an adapter's parts to one base tensor with :mod:`merge_math`'s arithmetic.
Shared by diff (effect comparison), audit (shape checks) and merge-adjacent tools.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..errors import CheckpointError
from . import merge_math as mm
from .devices import to_cpu, to_device
from .pairs import LoraPair, lora_pairs
from .view import Entry, Role

__all__ = ["LoraPair", "lora_pairs", "tensor_stats", "lora_effect_stats", "expert_effect_stats", "effective_weight"]  # pairs re-exported

_CHUNK = 1 << 22  # elements per chunk of a streamed comparison (32 MB as float64)




def tensor_stats(a: torch.Tensor, b: torch.Tensor, chunk: int = _CHUNK) -> tuple[float, float, float]:
    """(max |a-b|, ||a-b||_F, ||b||_F) in float64, chunk by chunk (bounded extra memory)."""
    x, y = a.detach().reshape(-1), b.detach().reshape(-1)
    max_abs, d2, b2 = 0.0, 0.0, 0.0
    for i in range(0, x.numel(), chunk):
        xs, ys = x[i : i + chunk].to(torch.float64), y[i : i + chunk].to(torch.float64)
        d = (xs - ys).abs_()
        if d.numel():
            m = d.max().item()
            max_abs = m if math.isnan(m) else max(max_abs, m)
            if math.isnan(max_abs):
                return math.nan, math.nan, math.nan
            d2 += float(torch.dot(d, d))
            b2 += float(torch.dot(ys, ys))
    return max_abs, math.sqrt(d2), math.sqrt(b2)


def _as_matrix_factors(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors as (B: out×r, A: r×rest) float64 matrices (Linear, Embedding and ConvNd alike)."""
    r = a.shape[0]
    return b.detach().reshape(b.shape[0], r).to(torch.float64), a.detach().reshape(r, -1).to(torch.float64)


def lora_effect_stats(
    a1: torch.Tensor,
    b1: torch.Tensor,
    s1: float,
    a2: torch.Tensor,
    b2: torch.Tensor,
    s2: float,
    *,
    atol: float = 0.0,
    need_max: bool = True,
    chunk: int = _CHUNK,
) -> tuple[float | None, float, float]:
    """(max abs, ||s1·B1A1 - s2·B2A2||_F, ||s2·B2A2||_F) without forming the out×in products for the norms.

    ``||X||² = tr((BᵀB)(AAᵀ))`` and the cross term ``tr((B1ᵀB2)(A2A1ᵀ))`` are r×r. The max abs needs the
    product: it is computed in row chunks of at most ``chunk`` elements, and only when the Frobenius
    distance exceeds ``atol`` (otherwise max ≤ Frobenius ≤ atol already decides; None is returned).
    """
    B1, A1 = _as_matrix_factors(a1, b1)
    B2, A2 = _as_matrix_factors(a2, b2)
    if B1.shape[0] != B2.shape[0] or A1.shape[1] != A2.shape[1]:
        raise ValueError("LoRA effects of different shapes")
    n11 = s1 * s1 * float(((B1.T @ B1) * (A1 @ A1.T)).sum())
    n22 = s2 * s2 * float(((B2.T @ B2) * (A2 @ A2.T)).sum())
    cross = s1 * s2 * float(((B1.T @ B2) * (A1 @ A2.T)).sum())
    if any(math.isnan(v) or math.isinf(v) for v in (n11, n22, cross)):
        return math.nan, math.nan, math.nan
    exact = s1 == s2 and torch.equal(A1, A2) and torch.equal(B1, B2)
    d2 = 0.0 if exact else max(n11 + n22 - 2.0 * cross, 0.0)
    diff, norm_b = math.sqrt(d2), math.sqrt(max(n22, 0.0))
    if exact:
        return 0.0, 0.0, norm_b
    if not need_max or diff <= atol:
        return None, diff, norm_b
    rows = max(1, chunk // max(1, A1.shape[1]))
    A1f, A2f = A1.to(torch.float32), A2.to(torch.float32)
    B1f, B2f = (B1 * s1).to(torch.float32), (B2 * s2).to(torch.float32)
    max_abs = 0.0
    for i in range(0, B1f.shape[0], rows):
        d = (B1f[i : i + rows] @ A1f).sub_(B2f[i : i + rows] @ A2f).abs_()
        max_abs = max(max_abs, float(d.max()))
    return max_abs, diff, norm_b




def expert_effect_stats(a1, b1, s1, a2, b2, s2, experts: int, *, atol: float = 0.0) -> tuple[float | None, float, float]:
    """:func:`lora_effect_stats` for a target_parameters LoRA on fused experts: ``lora_A (r·E, in)`` and
    ``lora_B (out, r·E)`` are E separate pairs (PEFT's reshape); stats are combined over the experts."""
    if a1.shape != a2.shape or b1.shape != b2.shape:
        raise ValueError("expert LoRA effects of different ranks are not compared")
    a1, a2 = a1.reshape(experts, -1, a1.shape[-1]), a2.reshape(experts, -1, a2.shape[-1])
    b1, b2 = b1.reshape(b1.shape[0], -1, experts), b2.reshape(b2.shape[0], -1, experts)
    max_abs: float | None = 0.0
    d2 = n2 = 0.0
    for e in range(experts):
        m, d, n = lora_effect_stats(a1[e], b1[:, :, e], s1, a2[e], b2[:, :, e], s2, atol=atol, need_max=True)
        max_abs = None if m is None or max_abs is None else max(max_abs, m)
        d2, n2 = d2 + d * d, n2 + n * n
    return max_abs, math.sqrt(d2), math.sqrt(n2)


def effective_weight(
    base: torch.Tensor | None,
    entries: list[Entry],
    *,
    scaling: Callable[[str, int | None], float],
    settings=None,
    bias_rank: int | None = None,
    device: torch.device = torch.device("cpu"),
) -> torch.Tensor:
    """What one canonical tensor becomes under an adapter: the replacement (modules_to_save, saved bias or
    base_layer) first, then the LoRA/DoRA delta or the scaled lora bias, then trainable-token rows. The
    arithmetic is :mod:`merge_math`'s (fp32, rounded once to the base tensor's dtype). The LoRA/DoRA product
    runs on ``device``; the result is on the CPU."""
    by_role = {e.role: e for e in entries}
    full = by_role.get(Role.FULL) or by_role.get(Role.BIAS)
    w = full.load() if full is not None else base
    if w is None:
        raise CheckpointError(f"{entries[0].target}: not in the base and not replaced by the adapter")
    out_dtype = base.dtype if base is not None else w.dtype
    a = by_role.get(Role.LORA_A) or by_role.get(Role.EMB_A)
    b = by_role.get(Role.LORA_B) or by_role.get(Role.EMB_B)
    if a is not None and b is not None:
        fa, fb = to_device(a.load(), device), to_device(b.load(), device)
        if a.param_wrapper:
            return to_cpu(_param_effective(to_device(w, device), fa, fb, a, scaling, out_dtype))
        s = scaling(a.source_module, fa.shape[0])
        if a.role is Role.EMB_A:
            kind, fifo = "embedding", False
        elif w.dim() > 2:
            kind, fifo = "conv", False
        else:
            kind = "linear"
            fifo = mm.fan_in_fan_out_from_shape(tuple(w.shape), tuple(fa.shape), tuple(fb.shape), bool(settings and settings.fan_in_fan_out))
            if fifo is None:
                raise CheckpointError(f"{a.target}: LoRA factors {list(fa.shape)}, {list(fb.shape)} do not fit a tensor {list(w.shape)}")
        mag = by_role.get(Role.MAGNITUDE)
        w = to_device(w, device)
        if mag is not None:
            w = mm.merge_dora(w, fa, fb, to_device(mag.load(), device), s, kind=kind, fan_in_fan_out=fifo, out_dtype=out_dtype)
        else:
            w = mm.merge_lora(w, fa, fb, s, kind=kind, fan_in_fan_out=fifo, out_dtype=out_dtype)
        w = to_cpu(w)
    lb = by_role.get(Role.LORA_BIAS)
    if lb is not None:
        w = mm.merge_lora_bias(w, lb.load(), scaling(lb.source_module, bias_rank), out_dtype=out_dtype)
    rows = by_role.get(Role.TOKEN_ROWS)
    if rows is not None:
        ids = settings.token_indices(rows.source_module) if settings is not None else None
        if ids is None:
            raise CheckpointError(f"{rows.key}: trainable-token rows without trainable_token_indices (pass --adapter-config)")
        w = mm.replace_rows(w, ids, rows.load(), out_dtype=out_dtype)
    return w.to(out_dtype)


def _param_effective(w, fa, fb, a: Entry, scaling, out_dtype) -> torch.Tensor:
    """A target_parameters LoRA applied as PEFT's ParamWrapper merge does (experts, or a 2-D weight)."""
    experts = w.shape[0] if w.dim() == 3 else 1
    if fa.shape[0] % experts:
        raise CheckpointError(f"{a.target}: lora_A {list(fa.shape)} does not split over {experts} experts")
    delta = mm.param_delta(fa, fb, scaling(f"{a.source_module}.{a.param}", fa.shape[0] // experts), experts)
    if tuple(delta.shape) != tuple(w.shape):
        if w.dim() == 3 and tuple(delta.shape) == (w.shape[0], w.shape[2], w.shape[1]):
            delta = delta.transpose(1, 2)  # a hub-layout file: (E, in, out)
        else:
            raise CheckpointError(f"{a.target}: LoRA factors {list(fa.shape)}, {list(fb.shape)} do not fit a tensor {list(w.shape)}")
    return mm.merge_param(w, delta, out_dtype).to(out_dtype)
