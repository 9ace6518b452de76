"""Audit checks that need values, streamed one tensor at a time: NaN/Inf, adapters that do nothing,
merged files whose config ties two different matrices."""

from __future__ import annotations

import torch

from ..errors import CheckpointError
from .audit_header import BaseFacts
from .pairs import lora_pairs
from .findings import few as _few
from .findings import finding as _finding
from .merge_math import all_finite
from .view import Checkpoint, Finding, Role

__all__ = ["value_checks"]


def _is_zero(t: torch.Tensor) -> bool:
    return t.numel() == 0 or not bool(t.reshape(-1).ne(0).any())


def _equal(t: torch.Tensor, u: torch.Tensor) -> bool:
    return t.shape == u.shape and bool(torch.equal(t.to(torch.float64) if t.dtype != u.dtype else t, u.to(torch.float64) if t.dtype != u.dtype else u))


def _dora_noop(m: torch.Tensor, w: torch.Tensor, embedding: bool) -> bool:
    """A DoRA magnitude at init equals the base weight norm (per output feature; per column for embeddings)."""
    w = w.to(torch.float64)
    norm = w.norm(dim=0) if embedding else w.reshape(w.shape[0], -1).norm(dim=1)
    m = m.reshape(-1).to(torch.float64)
    return m.shape == norm.shape and bool(torch.allclose(m, norm, rtol=1e-4, atol=1e-6))


@torch.no_grad()
def _merged_tie(ckpt: Checkpoint) -> list[Finding]:
    """A merged model whose config ties embed and head but whose file holds a different (trained) lm_head,
    as LLaMA-Factory exports do (peft#2777). What loads depends on the loader, so it is an error."""
    layout = ckpt.layout
    if ckpt.tie_word_embeddings is not True or not layout.embedding or not layout.head:
        return []
    own = {e.target: e for e in ckpt.entries}
    emb, head = own.get(f"{layout.embedding}.weight"), own.get(f"{layout.head}.weight")
    if emb is None or head is None or emb.shape != head.shape or _equal(emb.load(), head.load()):
        return []
    return [
        _finding(
            "tied-config-mismatch",
            "config.json ties the embedding and lm_head (tie_word_embeddings=true) but the file holds a different lm_head: "
            "transformers 4.x re-ties lm_head to the embedding on load and the trained head is lost; transformers >= 5 "
            "keeps both and logs it; set tie_word_embeddings=false (top level and text_config)",
            (emb.key, head.key),
        )
    ]


@torch.no_grad()
def value_checks(ckpt: Checkpoint, base_ckpt: Checkpoint | None) -> list[Finding]:
    out: list[Finding] = []
    base = BaseFacts(base_ckpt) if base_ckpt is not None else None
    pairs = lora_pairs(ckpt.entries)
    emb_modules = {p.module for p in pairs.values() if p.embedding}
    zero_factor: dict[str, bool] = {t: False for t in pairs}
    nonfinite: list[str] = []
    unreadable: list[tuple[str, str]] = []
    verdict: dict[str, bool | None] = {}  # non-LoRA entry key -> equals base (None: cannot tell)
    for e in ckpt.entries:
        if e.numel == 0:
            if e.role in (Role.LORA_A, Role.LORA_B, Role.EMB_A, Role.EMB_B):
                zero_factor[e.target] = zero_factor.get(e.target, False)
            continue
        try:
            t = e.load()
        except CheckpointError as err:
            unreadable.append((e.key, str(err)))
            continue
        if not all_finite(t):
            nonfinite.append(e.key)
            continue
        if not ckpt.is_adapter:
            if base is not None:
                b = base.entries.get(e.target)
                verdict[e.key] = b is not None and b.shape == e.shape and _equal(t, b.load())
            continue
        if e.role in (Role.LORA_A, Role.LORA_B, Role.EMB_A, Role.EMB_B):
            zero_factor[e.target] = zero_factor.get(e.target, False) or _is_zero(t)
        elif e.role is Role.LORA_BIAS:
            verdict[e.key] = _is_zero(t)
        elif base is None or base.entries.get(e.target) is None:
            verdict[e.key] = None
        elif e.role is Role.MAGNITUDE:
            verdict[e.key] = _dora_noop(t, base.entries[e.target].load(), e.module in emb_modules)
        elif e.role is Role.TOKEN_ROWS:
            ids = ckpt.adapter.token_indices(e.source_module) if ckpt.adapter else None
            w = base.entries[e.target].load()
            verdict[e.key] = None if ids is None or max(ids, default=-1) >= w.shape[0] else _equal(t, w[ids])
        else:
            verdict[e.key] = _equal(t, base.entries[e.target].load())
        del t
    if unreadable:
        out.append(_finding("unreadable", f"{len(unreadable)} tensors cannot be read: {unreadable[0][1]}", [k for k, _ in unreadable]))
    if nonfinite:
        out.append(_finding("nan-inf", f"{len(nonfinite)} tensors hold NaN or Inf values ({_few(nonfinite)})", nonfinite))
    if nonfinite or unreadable or not ckpt.entries:
        return out
    if not ckpt.is_adapter:
        out += _merged_tie(ckpt)
        if base is not None and verdict and all(verdict.values()):
            same = ckpt.path.resolve() == base_ckpt.path.resolve()
            what = f"SRC is --base itself ({base_ckpt.path.name})" if same else f"every tensor equals --base ({base_ckpt.path.name})"
            out.append(_finding("noop-adapter", f"{what}: the merge (or training) had no effect"))
        return out
    lora_zero = all(zero_factor.values())
    others = list(verdict.values())
    if lora_zero and all(v is True for v in others):
        what = "every LoRA pair has a zero factor (lora_B at init)" if pairs else "no LoRA"
        if others:
            what += " and every other tensor equals the base"
        out.append(_finding("noop-adapter", f"{what}: training had no effect", [p.b.key for p in pairs.values() if p.b is not None]))
    elif pairs and lora_zero and not any(v is False for v in others):
        unknown = sum(v is None for v in others)
        out.append(
            _finding(
                "noop-lora",
                f"every LoRA pair has a zero factor (lora_B at init): the LoRA part had no effect; "
                f"{unknown} other tensors not checked (pass --base)",
                [p.b.key for p in pairs.values() if p.b is not None],
            )
        )
    return out
