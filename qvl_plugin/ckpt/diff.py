"""What changed between two checkpoints, in the canonical name space, tensor by tensor.

Any two formats compare: a ``.pth`` dump and the PEFT adapter of the same run see the same rows, and so do
an old-layout and a new-layout adapter. Adapters compare by *effect*: a LoRA pair is the product
``s·B@A``, and ``||ΔW_a - ΔW_b||_F`` comes from r×r Gram products of the factors, never from the
out×in matrix. With a base, an adapter and a merged model compare by their effective weights.

Planning reads headers only; values are loaded one row at a time and released.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..errors import CheckpointError, UsageError
from .formats import detect_format
from .inspect import dtype_name
from .view import Checkpoint, Entry, Role, open_checkpoint

__all__ = [
    "TensorDiff",
    "GroupDiff",
    "DiffReport",
    "LoraPair",
    "diff_checkpoints",
    "lora_pairs",
    "tensor_stats",
    "lora_effect_stats",
    "effective_weight",
]

_CHUNK = 1 << 22  # elements per chunk of a streamed comparison (32 MB as float64)
_STRUCTURAL = ("only_a", "only_b", "shape")


# --------------------------------------------------------------------------------------------------------------
# Rows and report


@dataclass(frozen=True)
class TensorDiff:
    """One row: a canonical tensor (or the LoRA effect on it) in A against the same in B.

    ``status``: equal | changed (values) | dtype (values equal within atol, dtype differs) | shape |
    only_a | only_b. ``diff_norm`` is ``||a-b||_F``, ``norm_b`` is ``||b||_F`` (for a LoRA row: of B's
    delta). ``max_abs`` is None when it was not computed (a LoRA row whose Frobenius distance is already
    within atol, or a structural row).
    """

    name: str
    kind: str
    status: str
    group: str
    layer: int | None
    shape_a: tuple[int, ...] | None = None
    shape_b: tuple[int, ...] | None = None
    dtype_a: str | None = None
    dtype_b: str | None = None
    max_abs: float | None = None
    diff_norm: float | None = None
    norm_b: float | None = None
    keys_a: tuple[str, ...] = ()
    keys_b: tuple[str, ...] = ()
    note: str = ""

    @property
    def rel(self) -> float | None:
        """||a-b|| / ||b|| (inf when b is zero and a is not)."""
        if self.diff_norm is None or self.norm_b is None:
            return None
        if self.norm_b == 0:
            return 0.0 if self.diff_norm == 0 else math.inf
        return self.diff_norm / self.norm_b

    @property
    def equal(self) -> bool:
        return self.status == "equal"

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "status": self.status,
            "group": self.group,
            "layer": self.layer,
            "shape_a": list(self.shape_a) if self.shape_a is not None else None,
            "shape_b": list(self.shape_b) if self.shape_b is not None else None,
            "dtype_a": self.dtype_a,
            "dtype_b": self.dtype_b,
            "max_abs": _num(self.max_abs),
            "diff_norm": _num(self.diff_norm),
            "norm_b": _num(self.norm_b),
            "rel": _num(self.rel),
            "keys_a": list(self.keys_a),
            "keys_b": list(self.keys_b),
            "note": self.note,
        }


def _num(x: float | None) -> float | str | None:
    if x is None:
        return None
    return x if math.isfinite(x) else str(x)  # JSON has no inf/nan


@dataclass(frozen=True)
class GroupDiff:
    """A summary line: embedding, head, one language layer, the vision tower, the merger, other."""

    group: str
    layer: int | None
    rows: int
    changed: int
    diff_norm: float
    norm_b: float
    max_abs: float | None

    @property
    def label(self) -> str:
        return f"{self.group} {self.layer}" if self.layer is not None else self.group

    @property
    def rel(self) -> float:
        if self.norm_b == 0:
            return 0.0 if self.diff_norm == 0 else math.inf
        return self.diff_norm / self.norm_b

    def to_dict(self) -> dict:
        return {
            "group": self.group,
            "layer": self.layer,
            "rows": self.rows,
            "changed": self.changed,
            "diff_norm": _num(self.diff_norm),
            "norm_b": _num(self.norm_b),
            "rel": _num(self.rel),
            "max_abs": _num(self.max_abs),
        }


def _sort_key(row: TensorDiff) -> tuple:
    structural = row.status in _STRUCTURAL
    rel = row.rel if row.rel is not None else 0.0
    return (not structural, -(rel if not math.isnan(rel) else math.inf), -(row.diff_norm or 0.0), row.name, row.kind)


@dataclass
class DiffReport:
    """The answer of ``diff_checkpoints``: every row, sorted largest change first."""

    a: str
    b: str
    base: str | None
    mode: str  # "adapter" (factors/effects), "tensor" (two full models), "effective" (with a base)
    atol: float
    rows: list[TensorDiff]
    notes: list[str] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        return all(r.equal for r in self.rows)

    @property
    def changed(self) -> list[TensorDiff]:
        return [r for r in self.rows if not r.equal]

    @property
    def only_a(self) -> list[TensorDiff]:
        return [r for r in self.rows if r.status == "only_a"]

    @property
    def only_b(self) -> list[TensorDiff]:
        return [r for r in self.rows if r.status == "only_b"]

    def groups(self) -> list[GroupDiff]:
        """Group summaries, largest relative change first (language layers one line per index)."""
        acc: dict[tuple[str, int | None], list] = {}
        for r in self.rows:
            k = (r.group, r.layer if r.group == "language" else None)
            g = acc.setdefault(k, [0, 0, 0.0, 0.0, None])
            g[0] += 1
            g[1] += not r.equal
            g[2] += (r.diff_norm or 0.0) ** 2
            g[3] += (r.norm_b or 0.0) ** 2
            if r.max_abs is not None:
                g[4] = r.max_abs if g[4] is None else max(g[4], r.max_abs)
        out = [GroupDiff(grp, layer, n, c, math.sqrt(d), math.sqrt(b), m) for (grp, layer), (n, c, d, b, m) in acc.items()]
        return sorted(out, key=lambda g: (g.changed == 0, -(g.rel if not math.isnan(g.rel) else math.inf), -g.diff_norm, g.group, g.layer if g.layer is not None else -1))

    def to_dict(self, top: int | None = None) -> dict:
        changed = self.changed
        shown = changed if not top else changed[:top]
        return {
            "a": self.a,
            "b": self.b,
            "base": self.base,
            "mode": self.mode,
            "atol": self.atol,
            "equal": self.equal,
            "counts": {
                "rows": len(self.rows),
                "equal": len(self.rows) - len(changed),
                "changed": sum(r.status == "changed" for r in self.rows),
                "dtype": sum(r.status == "dtype" for r in self.rows),
                "shape": sum(r.status == "shape" for r in self.rows),
                "only_a": len(self.only_a),
                "only_b": len(self.only_b),
            },
            "groups": [g.to_dict() for g in self.groups()],
            "rows": [r.to_dict() for r in shown],
            "notes": list(self.notes),
        }


# --------------------------------------------------------------------------------------------------------------
# Streaming statistics


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


# --------------------------------------------------------------------------------------------------------------
# Planning (headers only)


@dataclass(frozen=True)
class LoraPair:
    """The LoRA factors acting on one canonical tensor (``a`` or ``b`` is None when the file lacks it)."""

    target: str
    module: str
    source_module: str
    a: Entry | None
    b: Entry | None

    @property
    def embedding(self) -> bool:
        e = self.a or self.b
        return e is not None and e.role in (Role.EMB_A, Role.EMB_B)

    @property
    def rank(self) -> int | None:
        if self.a is not None and self.a.shape:
            return self.a.shape[0]
        if self.b is not None and len(self.b.shape) > 1:
            return self.b.shape[1]
        return None

    @property
    def effect_shape(self) -> tuple[int, ...] | None:
        """Shape of ``B@A`` as the base tensor sees it (embeddings transposed, Conv1D not)."""
        if self.a is None or self.b is None or len(self.a.shape) < 2 or not self.b.shape:
            return None
        if self.embedding:
            return (self.a.shape[1], self.b.shape[0])
        return (self.b.shape[0], *self.a.shape[1:])


def lora_pairs(entries: Iterable[Entry]) -> dict[str, LoraPair]:
    """Canonical target -> its LoRA pair (header-only grouping of lora_A/lora_B and the embedding variants)."""
    parts: dict[str, dict[str, Entry]] = {}
    for e in entries:
        if e.role in (Role.LORA_A, Role.EMB_A):
            parts.setdefault(e.target, {})["a"] = e
        elif e.role in (Role.LORA_B, Role.EMB_B):
            parts.setdefault(e.target, {})["b"] = e
    out = {}
    for target, p in parts.items():
        any_e = p.get("a") or p.get("b")
        out[target] = LoraPair(target, any_e.module, any_e.source_module, p.get("a"), p.get("b"))
    return out


@dataclass
class _Item:
    """One comparable thing on one side: a stored tensor, a LoRA effect, a scaled lora bias, token rows."""

    name: str
    kind: str
    module: str
    entries: tuple[Entry, ...]
    pair: LoraPair | None = None
    scaling: float | None = None
    indices: list[int] | None = None

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(e.key for e in self.entries)

    @property
    def shape(self) -> tuple[int, ...] | None:
        if self.pair is not None:
            return self.pair.effect_shape
        return self.entries[0].shape

    @property
    def dtype(self) -> str:
        return "/".join(sorted({dtype_name(e.dtype) for e in self.entries}))


class _Scaling:
    """LoRA scaling for one side; a side without alpha borrows the other side's settings (noted)."""

    def __init__(self, own: Checkpoint, other: Checkpoint, label: str, notes: list[str]):
        self.settings = None
        if own.adapter is not None and own.adapter.lora_alpha is not None:
            self.settings = own.adapter
        elif other.adapter is not None and other.adapter.lora_alpha is not None and any(
            e.role in (Role.LORA_A, Role.EMB_A) for e in own.entries
        ):
            self.settings = other.adapter
            notes.append(f"{label} has no lora_alpha: used the other side's adapter settings (alpha {other.adapter.lora_alpha:g})")
        elif any(e.role in (Role.LORA_A, Role.EMB_A) for e in own.entries):
            notes.append(f"{label} has no lora_alpha: its LoRA effects are compared unscaled (B@A, scaling 1)")

    def __call__(self, source_module: str, rank: int | None) -> float:
        if self.settings is None or rank is None:
            return 1.0
        return self.settings.scaling(source_module, rank)


def _items(ckpt: Checkpoint, scaling: _Scaling) -> dict[tuple[str, str], _Item]:
    """Header-only: the comparable items of one checkpoint, keyed by (canonical name, kind)."""
    items: dict[tuple[str, str], _Item] = {}
    pairs = lora_pairs(ckpt.entries)
    for target, pair in pairs.items():
        if pair.a is not None and pair.b is not None:
            items[(target, "lora")] = _Item(target, "lora", pair.module, (pair.a, pair.b), pair, scaling(pair.source_module, pair.rank))
        else:
            e = pair.a or pair.b
            items[(target, e.role.value)] = _Item(target, e.role.value, e.module, (e,))
    for e in ckpt.entries:
        if e.role in (Role.LORA_A, Role.LORA_B, Role.EMB_A, Role.EMB_B):
            continue
        if e.role is Role.LORA_BIAS:
            pair = pairs.get(f"{e.module}.weight")
            items[(e.target, "lora_bias")] = _Item(e.target, "lora_bias", e.module, (e,), None, scaling(e.source_module, pair.rank if pair else None))
        elif e.role is Role.MAGNITUDE:
            items[(e.target, "magnitude")] = _Item(e.target, "magnitude", e.module, (e,))
        elif e.role is Role.TOKEN_ROWS:
            ids = ckpt.adapter.token_indices(e.source_module) if ckpt.adapter else None
            items[(e.target, "token_rows")] = _Item(e.target, "token_rows", e.module, (e,), indices=ids)
        else:  # BASE, FULL, BIAS: a stored tensor that is (or replaces) the base tensor
            items[(e.target, "tensor")] = _Item(e.target, "tensor", e.module, (e,))
    if not ckpt.is_adapter:
        _tied_head(ckpt, items)
    return items


def _tied_head(ckpt: Checkpoint, items: dict[tuple[str, str], _Item]) -> None:
    """A tied full model may store only the embedding; in memory its head *is* that matrix."""
    layout = ckpt.layout
    if not layout.embedding or not layout.head or ckpt.tie_word_embeddings is False:
        return
    emb, head = (f"{layout.embedding}.weight", "tensor"), (f"{layout.head}.weight", "tensor")
    if emb in items and head not in items:
        items[head] = _Item(head[0], "tensor", layout.head, items[emb].entries)


def _load(item: _Item) -> torch.Tensor:
    t = item.entries[0].load()
    if item.kind == "lora_bias":
        t = t.to(torch.float64) * (item.scaling or 1.0)
    return t


def _compare_items(x: _Item, y: _Item, atol: float, group: str, layer: int | None) -> TensorDiff:
    common = dict(
        name=x.name, kind=x.kind, group=group, layer=layer, shape_a=x.shape, shape_b=y.shape,
        dtype_a=x.dtype, dtype_b=y.dtype, keys_a=x.keys, keys_b=y.keys,
    )
    if x.shape != y.shape:
        return TensorDiff(status="shape", **common)
    note = ""
    if x.kind == "lora":
        ra, rb = x.pair.rank, y.pair.rank
        if ra != rb:
            note = f"rank {ra} -> {rb}"
        max_abs, diff, norm_b = lora_effect_stats(
            x.pair.a.load(), x.pair.b.load(), x.scaling or 1.0, y.pair.a.load(), y.pair.b.load(), y.scaling or 1.0, atol=atol
        )
    else:
        if x.kind == "token_rows" and x.indices != y.indices:
            note = f"token indices {x.indices} -> {y.indices}"
        max_abs, diff, norm_b = tensor_stats(_load(x), _load(y))
    within = (max_abs is not None and max_abs <= atol) or (max_abs is None and diff <= atol)
    if within and not note.startswith("token indices"):
        status = "equal" if x.dtype == y.dtype else "dtype"
    else:
        status = "changed"
    return TensorDiff(status=status, max_abs=max_abs, diff_norm=diff, norm_b=norm_b, note=note, **common)


def _only(item: _Item, side: str, group: str, layer: int | None) -> TensorDiff:
    shape, dtype, keys = item.shape, item.dtype, item.keys
    if side == "a":
        return TensorDiff(item.name, item.kind, "only_a", group, layer, shape_a=shape, dtype_a=dtype, keys_a=keys)
    return TensorDiff(item.name, item.kind, "only_b", group, layer, shape_b=shape, dtype_b=dtype, keys_b=keys)


def _diff_items(a: Checkpoint, b: Checkpoint, atol: float, notes: list[str]) -> list[TensorDiff]:
    ia = _items(a, _Scaling(a, b, "A", notes))
    ib = _items(b, _Scaling(b, a, "B", notes))
    layout = a.layout if a.layout.name != "unknown" else b.layout
    rows = []
    for key in sorted(set(ia) | set(ib)):
        x, y = ia.get(key), ib.get(key)
        module = (x or y).module
        group, layer = layout.group(module), layout.layer_index(module)
        if x is None:
            rows.append(_only(y, "b", group, layer))
        elif y is None:
            rows.append(_only(x, "a", group, layer))
        else:
            rows.append(_compare_items(x, y, atol, group, layer))
    if any(e.role is Role.MAGNITUDE for c in (a, b) for e in c.entries):
        notes.append("DoRA: magnitudes are compared as stored; pass --base to compare effective weights")
    return rows


# --------------------------------------------------------------------------------------------------------------
# Effective weights (with a base)


class _Effective:
    """Effective weights of one side, one canonical tensor at a time: a merged model's own tensors, or
    base + this adapter's replacement / LoRA / DoRA / token rows applied (the merge math)."""

    def __init__(self, ckpt: Checkpoint, base: Checkpoint, base_tensors: dict[str, Entry], scaling: _Scaling):
        self.ckpt, self.base, self.base_tensors, self.scaling = ckpt, base, base_tensors, scaling
        self.own = {e.target: e for e in ckpt.entries} if not ckpt.is_adapter else {}
        self.by_target = ckpt.by_target() if ckpt.is_adapter else {}
        self.pairs = lora_pairs(ckpt.entries) if ckpt.is_adapter else {}
        self.settings = scaling.settings or ckpt.adapter
        layout = base.layout
        self.embed = f"{layout.embedding}.weight" if layout.embedding else None
        self.head = f"{layout.head}.weight" if layout.head else None

    def targets(self) -> set[str]:
        return set(self.own) if not self.ckpt.is_adapter else set(self.by_target)

    def keys(self, target: str) -> tuple[str, ...]:
        if not self.ckpt.is_adapter:
            e = self.own.get(target)
            return (e.key,) if e else ()
        return tuple(e.key for e in self.by_target.get(target, ()))

    def _base_tensor(self, target: str) -> torch.Tensor | None:
        e = self.base_tensors.get(target)
        if e is None and target == self.head and self.embed in self.base_tensors:
            e = self.base_tensors[self.embed]  # tied base: the head is the embedding matrix
        return e.load() if e is not None else None

    def has(self, target: str) -> bool:
        if not self.ckpt.is_adapter:
            return target in self.own or (target == self.head and self.embed in self.own)
        return target in self.by_target or target in self.base_tensors or (target == self.head and self.embed in self.base_tensors)

    def shape_dtype(self, target: str) -> tuple[tuple[int, ...] | None, str | None]:
        if not self.ckpt.is_adapter:
            e = self.own.get(target) or (self.own.get(self.embed) if target == self.head else None)
        else:
            full = [x for x in self.by_target.get(target, ()) if x.role in (Role.FULL, Role.BIAS)]
            e = full[0] if full else self.base_tensors.get(target) or (self.base_tensors.get(self.embed) if target == self.head else None)
        return (e.shape, dtype_name(e.dtype)) if e is not None else (None, None)

    def load(self, target: str) -> torch.Tensor:
        if not self.ckpt.is_adapter:
            e = self.own.get(target) or self.own[self.embed]  # a tied merged model stores only the embedding
            return e.load()
        entries = self.by_target.get(target, [])
        if not entries:
            return self._base_tensor(target)
        module, _, param = target.rpartition(".")
        pair = self.pairs.get(f"{module}.weight") if param != "weight" else None
        return effective_weight(self._base_tensor(target), entries, scaling=self.scaling, settings=self.settings,
                                bias_rank=pair.rank if pair else None)


def effective_weight(
    base: torch.Tensor | None,
    entries: list[Entry],
    *,
    scaling: Callable[[str, int | None], float],
    settings=None,
    bias_rank: int | None = None,
) -> torch.Tensor:
    """What one canonical tensor becomes under an adapter: the replacement (modules_to_save, saved bias or
    base_layer) first, then the LoRA/DoRA delta or the scaled lora bias, then trainable-token rows. The
    arithmetic is :mod:`merge_math`'s (fp32, rounded once to the base tensor's dtype)."""
    from . import merge_math as mm

    by_role = {e.role: e for e in entries}
    full = by_role.get(Role.FULL) or by_role.get(Role.BIAS)
    w = full.load() if full is not None else base
    if w is None:
        raise CheckpointError(f"{entries[0].target}: not in the base and not replaced by the adapter")
    out_dtype = base.dtype if base is not None else w.dtype
    a = by_role.get(Role.LORA_A) or by_role.get(Role.EMB_A)
    b = by_role.get(Role.LORA_B) or by_role.get(Role.EMB_B)
    if a is not None and b is not None:
        fa, fb = a.load(), b.load()
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
        if mag is not None:
            w = mm.merge_dora(w, fa, fb, mag.load(), s, kind=kind, fan_in_fan_out=fifo, out_dtype=out_dtype)
        else:
            w = mm.merge_lora(w, fa, fb, s, kind=kind, fan_in_fan_out=fifo, out_dtype=out_dtype)
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


def _diff_effective(a: Checkpoint, b: Checkpoint, base: Checkpoint, atol: float, notes: list[str]) -> list[TensorDiff]:
    base_tensors = {e.target: e for e in base.entries}
    sa, sb = _Scaling(a, b, "A", notes), _Scaling(b, a, "B", notes)
    ea, eb = _Effective(a, base, base_tensors, sa), _Effective(b, base, base_tensors, sb)
    if a.is_adapter and b.is_adapter:
        targets = ea.targets() | eb.targets()
    else:
        targets = set(base_tensors) | ea.targets() | eb.targets()
        notes.append("effective weights: every tensor of the base and the merged model(s) is compared")
    layout = base.layout
    rows = []
    for target in sorted(targets):
        module = target.rpartition(".")[0]
        group, layer = layout.group(module), layout.layer_index(module)
        sha, dta = ea.shape_dtype(target)
        shb, dtb = eb.shape_dtype(target)
        ka, kb = ea.keys(target), eb.keys(target)
        has_a, has_b = ea.has(target) and sha is not None, eb.has(target) and shb is not None
        if not has_a or not has_b:
            if has_a:
                rows.append(TensorDiff(target, "effective", "only_a", group, layer, shape_a=sha, dtype_a=dta, keys_a=ka))
            elif has_b:
                rows.append(TensorDiff(target, "effective", "only_b", group, layer, shape_b=shb, dtype_b=dtb, keys_b=kb))
            else:
                rows.append(TensorDiff(target, "effective", "only_a" if ka else "only_b", group, layer, keys_a=ka, keys_b=kb, note="not in the base"))
            continue
        common = dict(group=group, layer=layer, shape_a=sha, shape_b=shb, dtype_a=dta, dtype_b=dtb, keys_a=ka, keys_b=kb)
        if sha != shb:
            rows.append(TensorDiff(target, "effective", "shape", **common))
            continue
        max_abs, diff, norm_b = tensor_stats(ea.load(target), eb.load(target))
        status = ("equal" if dta == dtb else "dtype") if max_abs <= atol else "changed"
        rows.append(TensorDiff(target, "effective", status, max_abs=max_abs, diff_norm=diff, norm_b=norm_b, **common))
    return rows


# --------------------------------------------------------------------------------------------------------------
# Entry point


def _open(x: Checkpoint | str | Path, opened: list[Checkpoint], **kw) -> Checkpoint:
    if isinstance(x, Checkpoint):
        return x
    c = open_checkpoint(x, **kw)
    opened.append(c)
    return c


@torch.no_grad()
def diff_checkpoints(
    a: Checkpoint | str | Path,
    b: Checkpoint | str | Path,
    *,
    base: Checkpoint | str | Path | None = None,
    atol: float = 0.0,
    adapter_config: str | Path | None = None,
    lora_alpha: float | None = None,
) -> DiffReport:
    """Compare A with B (B is the reference for relative change). Paths are opened and closed here.

    ``adapter_config``/``lora_alpha`` apply to ``.pth`` inputs that lack LoRA settings. Raises
    ``UsageError`` for comparisons that cannot be made (an adapter against a merged model without a base).
    """
    if atol < 0 or math.isnan(atol):
        raise UsageError(f"--atol must be >= 0, got {atol}")
    opened: list[Checkpoint] = []
    try:
        ca = _open_side(a, opened, adapter_config, lora_alpha)
        cb = _open_side(b, opened, adapter_config, lora_alpha)
        cbase = _open(base, opened) if base is not None else None
        if cbase is not None and cbase.is_adapter:
            raise UsageError(f"--base must be a full model, {cbase.path} is an adapter")
        notes: list[str] = []
        if cbase is None:
            if ca.is_adapter != cb.is_adapter:
                raise UsageError("comparing an adapter with a merged model needs --base BASE (effective weights)")
            mode = "adapter" if ca.is_adapter else "tensor"
            rows = _diff_items(ca, cb, atol, notes)
        else:
            mode = "effective"
            rows = _diff_effective(ca, cb, cbase, atol, notes)
        rows.sort(key=_sort_key)
        return DiffReport(str(ca.path), str(cb.path), str(cbase.path) if cbase else None, mode, atol, rows, notes)
    finally:
        for c in opened:
            c.close()


def _open_side(x, opened, adapter_config, lora_alpha) -> Checkpoint:
    if isinstance(x, Checkpoint):
        return x
    p = Path(x)
    kw = {}
    if (adapter_config is not None or lora_alpha is not None) and p.exists() and detect_format(p) == "pth":
        kw = {"adapter_config": adapter_config, "lora_alpha": lora_alpha}
    return _open(p, opened, **kw)
