"""Byte counts for people: decimal units, like huggingface_hub's shard sizes (``5GB``)."""

from __future__ import annotations

__all__ = ["human_bytes"]


def human_bytes(n: int | float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"  # pragma: no cover
