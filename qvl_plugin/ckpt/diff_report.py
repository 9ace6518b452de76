"""The rows and summaries a diff returns: one row per canonical tensor (or LoRA effect), groups, JSON."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .config_diff import ConfigDiff

__all__ = ["TensorDiff", "GroupDiff", "DiffReport", "sort_key"]

_STRUCTURAL = ("only_a", "only_b", "shape")


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


def sort_key(row: TensorDiff) -> tuple:
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
    config: list[ConfigDiff] = field(default_factory=list)  # behaviour-changing config.json fields that differ

    @property
    def equal(self) -> bool:
        return not self.config and all(r.equal for r in self.rows)

    @property
    def tensors_equal(self) -> bool:
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
            "config": [c.to_dict() for c in self.config],
            "groups": [g.to_dict() for g in self.groups()],
            "rows": [r.to_dict() for r in shown],
            "notes": list(self.notes),
        }
