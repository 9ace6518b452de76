"""Shard planning: which tensor goes to which safetensors file, at which byte offset, before any is written.

``huggingface_hub``'s greedy split and ``save_pretrained``'s file names, so the output looks like any
other Hugging Face model; every header can be written first and tensors streamed after it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..errors import UsageError, WriteError
from .dtypes import SAFETENSORS_NAMES

__all__ = ["TensorSpec", "ShardPlan", "parse_size", "plan_shards", "header_bytes", "SAFE_WEIGHTS_NAME", "SAFE_WEIGHTS_INDEX_NAME"]

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_DTYPE_NAMES = {getattr(torch, attr): name for name, attr in SAFETENSORS_NAMES.items() if hasattr(torch, attr)}


@dataclass(frozen=True)
class TensorSpec:
    """One output tensor: its key in the file, shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True)
class ShardPlan:
    """Which tensor goes to which file, in which order. ``shards`` = ((file name, specs), ...)."""

    shards: tuple[tuple[str, tuple[TensorSpec, ...]], ...]
    total_size: int
    total_parameters: int
    metadata: dict[str, str] = field(default_factory=lambda: {"format": "pt"})

    @property
    def sharded(self) -> bool:
        return len(self.shards) > 1

    @property
    def order(self) -> list[TensorSpec]:
        """Every tensor in the order it must be written."""
        return [spec for _, specs in self.shards for spec in specs]

    @property
    def weight_map(self) -> dict[str, str]:
        return {spec.name: fname for fname, specs in self.shards for spec in specs}

    def index_name(self) -> str:
        first = self.shards[0][0]
        stem = first.split("-00001-of-")[0] if self.sharded else first[: -len(".safetensors")]
        return f"{stem}.safetensors.index.json"

    def index(self) -> dict | None:
        """``model.safetensors.index.json`` as ``save_pretrained`` writes it (None for a single file)."""
        if not self.sharded:
            return None
        return {
            "metadata": {"total_parameters": self.total_parameters, "total_size": self.total_size},
            "weight_map": dict(sorted(self.weight_map.items())),
        }


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: int | str) -> int:
    """``"5GB"`` -> 5_000_000_000 (decimal units like huggingface_hub; ``GiB`` etc. are binary)."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
        if not m or m.group(2).upper() not in _UNITS:
            raise UsageError(f"invalid size {value!r} (examples: 5GB, 500MB, 2GiB, 1000000)")
        size = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if size <= 0:
        raise UsageError(f"size must be positive, got {value!r}")
    return size


def plan_shards(specs: Sequence[TensorSpec], max_shard_size: int | str = "5GB", filename: str = SAFE_WEIGHTS_NAME) -> ShardPlan:
    """Greedy split in the given order, like ``split_torch_state_dict_into_shards``; one file when it fits.

    Shards are named like ``save_pretrained``: ``model-00001-of-00003.safetensors`` (from ``filename``).

    Inside a shard, tensors are ordered by element size (largest first, stable) so every tensor starts
    at an offset aligned to its own dtype.
    """
    limit = parse_size(max_shard_size)
    seen: set[str] = set()
    groups: list[list[TensorSpec]] = []
    current: list[TensorSpec] = []
    current_size = 0
    for spec in specs:
        if spec.name in seen:
            raise ValueError(f"tensor {spec.name!r} planned twice")
        if spec.dtype not in _DTYPE_NAMES:
            raise WriteError(f"tensor {spec.name!r}: dtype {spec.dtype} cannot be stored in safetensors")
        seen.add(spec.name)
        size = spec.nbytes
        if size > limit:
            groups.append([spec])
            continue
        if current and current_size + size > limit:
            groups.append(current)
            current, current_size = [], 0
        current.append(spec)
        current_size += size
    if current or not groups:
        groups.append(current)
    n = len(groups)
    shards = []
    for i, group in enumerate(groups):
        stem = filename[: -len(".safetensors")] if filename.endswith(".safetensors") else filename
        fname = filename if n == 1 else f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors"
        ordered = sorted(group, key=lambda s: -s.dtype.itemsize)
        shards.append((fname, tuple(ordered)))
    total = sum(s.nbytes for s in specs)
    params = sum(s.numel for s in specs)
    return ShardPlan(tuple(shards), total, params)


def header_bytes(specs: Sequence[TensorSpec], metadata: dict[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    pos = 0
    for spec in specs:
        header[spec.name] = {"dtype": _DTYPE_NAMES[spec.dtype], "shape": list(spec.shape), "data_offsets": [pos, pos + spec.nbytes]}
        pos += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes so the data is aligned
    return len(raw).to_bytes(8, "little") + raw
