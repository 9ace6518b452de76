"""LoRA pairs grouped from headers alone: which lora_A/lora_B (or embedding A/B) act on which base tensor.

Torch-free, so audit's header checks and inspect can use it without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from .view import Entry, Role

__all__ = ["LoraPair", "lora_pairs"]


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
