"""Safe reading: safetensors header checks, pickle loading without code execution, path containment.

Checkpoints come from strangers. Nothing here executes code from a file, and every structural claim a
file makes (header length, offsets, byte counts, shard paths) is checked before it is believed.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, UnsafeCheckpointError

__all__ = [
    "MAX_HEADER_BYTES",
    "SAFETENSORS_DTYPES",
    "read_safetensors_header",
    "safe_torch_load",
    "resolve_inside",
    "read_json",
]

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr)
    for name, attr in {
        "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
        "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
        "U16": "uint16", "U32": "uint32", "U64": "uint64",
        "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    }.items()
    if hasattr(torch, attr)
}


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def read_safetensors_header(path: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """Parse and validate a safetensors header without touching tensor data.

    Returns ``({name: {"dtype", "shape", "data_offsets"}}, metadata)``. Rejects what the format forbids:
    oversized or non-UTF-8 headers, duplicate names, unknown dtypes, byte ranges that overlap, leave gaps,
    disagree with shape x dtype, or run past the end of the file.
    """
    name = path.name
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise UnsafeCheckpointError(f"{name}: truncated safetensors file ({size} bytes)")
            n = int.from_bytes(prefix, "little")
            if n > MAX_HEADER_BYTES or n + 8 > size:
                raise UnsafeCheckpointError(f"{name}: safetensors header length {n} is impossible for a {size}-byte file")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{name}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise UnsafeCheckpointError(f"{name}: corrupt safetensors header ({str(e)[:120]})") from None
    if not isinstance(header, dict):
        raise UnsafeCheckpointError(f"{name}: corrupt safetensors header (not an object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise UnsafeCheckpointError(f"{name}: corrupt safetensors header (__metadata__ must map strings to strings)")
    data_len = size - 8 - n
    spans = []
    for key, info in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = [int(s) for s in info["shape"]]
            start, end = (int(o) for o in info["data_offsets"])
            if any(isinstance(s, bool) or s < 0 for s in info["shape"]) or len(info["data_offsets"]) != 2:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise UnsafeCheckpointError(f"{name}: corrupt safetensors header entry {key[:80]!r}") from None
        numel = 1
        for s in shape:
            numel *= s
        if not 0 <= start <= end <= data_len or end - start != numel * dtype.itemsize:
            raise UnsafeCheckpointError(
                f"{name}: tensor {key[:80]!r} claims bytes {start}..{end} that do not match its shape/dtype or the file"
            )
        spans.append((start, end, key))
    spans.sort()
    pos = 0
    for start, end, key in spans:
        if start != pos:
            raise UnsafeCheckpointError(f"{name}: tensor {key[:80]!r} overlaps another or leaves a gap in the data")
        pos = end
    if pos != data_len:
        raise UnsafeCheckpointError(f"{name}: data section is {data_len} bytes but tensors cover {pos} (truncated or padded)")
    return header, metadata


def safe_torch_load(path: Path) -> Any:
    """``torch.load`` that never runs code from the file and never reads tensor data eagerly."""
    name = path.name
    try:
        is_zip = zipfile.is_zipfile(path)
    except OSError as e:
        raise CheckpointError(f"{name}: cannot read ({e.strerror or e})") from None
    if not is_zip:
        raise CheckpointError(
            f"{name}: not a torch zip checkpoint (legacy or corrupt pickle; re-save with a current torch.save)"
        )
    try:
        return torch.load(path, weights_only=True, mmap=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        detail = next((line for line in first if "GLOBAL" in line or "Unsupported" in line), first[0] if first else "")
        raise UnsafeCheckpointError(
            f"{name}: refused: the pickle needs more than tensors and plain containers ({detail.strip()[:160]})"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile, KeyError, AttributeError, TypeError, IndexError) as e:
        raise CheckpointError(f"{name}: cannot read torch checkpoint ({str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__})") from None


def resolve_inside(directory: Path, relative: str) -> Path:
    """Join ``relative`` onto ``directory`` and refuse anything that escapes it (``..``, absolute, symlinks)."""
    if not isinstance(relative, str) or not relative or os.path.isabs(relative) or "\x00" in relative:
        raise UnsafeCheckpointError(f"refused path {relative!r} in {directory.name}: must be a file name inside the directory")
    target = (directory / relative).resolve()
    root = directory.resolve()
    if root not in target.parents:
        raise UnsafeCheckpointError(f"refused path {relative!r} in {directory.name}: it points outside the directory")
    return target


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path.name}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path.name}: cannot read ({e})") from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path.name}: not valid JSON ({str(e)[:120]})") from None
