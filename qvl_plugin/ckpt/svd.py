"""Truncated SVD of a weight delta into LoRA factors: the math of ``extract``, apart from its I/O.

``B = U·√S``, ``A = √S·Vᵀ`` in fp32, so ``B @ A`` is the best rank-r fit of ``ΔW``; the relative error
``||ΔW - B·A||_F / ||ΔW||_F`` comes from the discarded singular values (exact path) or is measured on the
factors (randomized path, ``torch.svd_lowrank``: O(out·in·q) instead of O(out·in·min(out, in))).
"""

from __future__ import annotations

import math

import torch

from .devices import to_device

__all__ = ["SVD_METHODS", "svd_factors", "truncated_svd", "choose_rank"]

SVD_METHODS = ("auto", "exact", "lowrank")
LOWRANK_MIN_DIM = 1024  # below this the full SVD is fast enough and exact
OVERSAMPLE = 16         # extra columns of the randomized range finder (Halko et al.: 5-20)
NITER = 2               # power iterations (torch's default): measured within 1e-6 of the exact error on merged-LoRA deltas


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


def _cap(r: int, s: torch.Tensor, max_rank: int | None, sv_epsilon: float) -> int:
    """Apply ``--max-rank`` and ``--sv-epsilon`` (singular values <= epsilon are dropped; at least rank 1)."""
    if max_rank is not None:
        r = min(r, max_rank)
    if sv_epsilon > 0:
        r = min(r, int((s > sv_epsilon).sum()))
    return max(1, min(r, s.numel()))


def _use_lowrank(shape: tuple[int, int], want: int | None, method: str) -> bool:
    if method != "auto":
        return method == "lowrank" and want is not None
    small = min(shape)
    return want is not None and small >= LOWRANK_MIN_DIM and want + OVERSAMPLE <= small // 4


def svd_factors(delta: torch.Tensor, rank: int | str = 16, energy: float = 0.99, **kw) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``delta (out, in)`` -> ``(A (r, in), B (out, r), rel_error)``, ``B @ A`` the best rank-r fit (see :func:`truncated_svd`)."""
    return truncated_svd(delta, rank, energy, **kw)[:3]


def truncated_svd(
    delta: torch.Tensor,
    rank: int | str = 16,
    energy: float = 0.99,
    *,
    max_rank: int | None = None,
    sv_epsilon: float = 0.0,
    method: str = "auto",
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, float, str]:
    """``delta (out, in)`` -> ``(A, B, rel_error, method used)``.

    ``method``: ``exact`` (full SVD), ``lowrank`` (randomized, needs a known rank bound: a fixed rank or
    ``max_rank``), ``auto`` (lowrank for large matrices when the bound is far below the size). A and B are
    returned on the CPU.
    """
    dev = torch.device(device)
    d = to_device(delta, dev).float()
    want = (rank if rank != "auto" else None) if max_rank is None else (min(rank, max_rank) if rank != "auto" else max_rank)
    if _use_lowrank(tuple(d.shape), want, method):
        return _lowrank(d, rank, energy, want, sv_epsilon)
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    r = _cap(choose_rank(s, rank, energy), s, max_rank, sv_epsilon)
    root = s[:r].sqrt()
    b = (u[:, :r] * root).contiguous().cpu()
    a = (root[:, None] * vh[:r]).contiguous().cpu()
    power = s.double() ** 2
    total = float(power.sum())
    err = math.sqrt(max(0.0, float(power[r:].sum())) / total) if total > 0 else 0.0
    return a, b, err, "exact"


def _lowrank(d: torch.Tensor, rank: int | str, energy: float, want: int, sv_epsilon: float) -> tuple[torch.Tensor, torch.Tensor, float, str]:
    """Randomized truncated SVD; the rank from the top singular values against the exact ``||ΔW||²``, and the
    error measured on the factors, ``||ΔW - BA||`` in row chunks (the discarded σ are unknown here)."""
    q = min(min(d.shape), want + OVERSAMPLE)
    with torch.random.fork_rng(devices=[d.device] if d.device.type == "cuda" else []):
        torch.manual_seed(0)  # reproducible factors, the global RNG untouched
        u, s, v = torch.svd_lowrank(d, q=q, niter=NITER)
    total = sum(float(c.pow(2).sum(dtype=torch.float64)) for c in d.split(max(1, (1 << 22) // max(1, d.shape[1]))))
    if rank == "auto":
        kept = torch.cumsum(s.double() ** 2, 0) / total if total > 0 else torch.ones_like(s, dtype=torch.float64)
        r = int(torch.searchsorted(kept, torch.tensor(energy, dtype=kept.dtype, device=kept.device)).item()) + 1
    else:
        r = int(rank)
    r = _cap(min(r, want), s, None, sv_epsilon)
    root = s[:r].sqrt()
    b = (u[:, :r] * root).contiguous()
    a = (root[:, None] * v[:, :r].T).contiguous()
    if total <= 0:
        return a.cpu(), b.cpu(), 0.0, "lowrank"
    step = max(1, (1 << 22) // max(1, d.shape[1]))  # the residual in row chunks: bounded memory, no cancellation
    resid = sum(float(torch.addmm(d[i:i + step], b[i:i + step], a, alpha=-1.0).pow_(2).sum(dtype=torch.float64))
                for i in range(0, d.shape[0], step))
    err = math.sqrt(max(0.0, resid) / total)
    return a.cpu(), b.cpu(), err, "lowrank"
