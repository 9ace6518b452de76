"""Safe reading: safetensors header checks, pickle loading without code execution, path containment.

Checkpoints come from strangers. Nothing here executes code from a file, and every structural claim a
file makes (header length, offsets, byte counts, shard paths) is checked before it is believed.
"""

from __future__ import annotations

import json
import os
import pickle
import stat
import warnings
import zipfile
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, UnsafeCheckpointError
from .dtypes import SAFETENSORS_NAMES, itemsize

__all__ = [
    "MAX_HEADER_BYTES",
    "read_safetensors_header",
    "safe_torch_load",
    "resolve_inside",
    "read_json",
]

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit
MAX_JSON_BYTES = 64 * 1024 * 1024  # config/index/adapter JSON files are kilobytes; refuse to slurp a huge one
_MAX_DIM = 2**63 - 1  # what torch (int64 sizes) and safetensors (usize) can represent



def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _check_regular(path: Path) -> int:
    """Size of ``path`` if it is a regular file (after symlinks). A FIFO or device would block or never end."""
    try:
        st = path.stat()
    except OSError as e:
        raise CheckpointError(f"{path.name}: cannot read ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path.name}: not a regular file")
    return st.st_size


def _is_int(v: Any) -> bool:
    return type(v) is int  # JSON floats (2.0, 1e3, Infinity, NaN) and booleans are not sizes


def read_safetensors_header(path: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """Parse and validate a safetensors header without touching tensor data.

    Returns ``({name: {"dtype", "shape", "data_offsets"}}, metadata)``. Rejects what the format forbids:
    oversized or non-UTF-8 headers, duplicate names, unknown dtypes, byte ranges that overlap, leave gaps,
    disagree with shape x dtype, or run past the end of the file.
    """
    name = path.name
    size = _check_regular(path)
    try:
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
            size = itemsize(SAFETENSORS_NAMES[info["dtype"]])
            shape, offsets = info["shape"], info["data_offsets"]
            if not (isinstance(shape, list) and isinstance(offsets, list) and len(offsets) == 2):
                raise ValueError
            if not all(_is_int(s) and 0 <= s <= _MAX_DIM for s in shape + offsets):
                raise ValueError
            start, end = offsets
        except (KeyError, TypeError, ValueError):
            raise UnsafeCheckpointError(f"{name}: corrupt safetensors header entry {key[:80]!r}") from None
        numel = 1
        for s in shape:
            numel *= s
        if not 0 <= start <= end <= data_len or end - start != numel * size:
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
    _check_regular(path)
    try:
        is_zip = zipfile.is_zipfile(path)
    except OSError as e:
        raise CheckpointError(f"{name}: cannot read ({e.strerror or e})") from None
    if not is_zip:
        raise CheckpointError(
            f"{name}: not a torch zip checkpoint (legacy or corrupt pickle; re-save with a current torch.save)"
        )
    import torch

    try:
        with warnings.catch_warnings():  # torch's deprecation chatter about odd tensors must not break the one-line contract
            warnings.simplefilter("ignore")
            return torch.load(path, weights_only=True, mmap=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        detail = next((line for line in first if "GLOBAL" in line or "Unsupported" in line), first[0] if first else "")
        raise UnsafeCheckpointError(
            f"{name}: refused: the pickle needs more than tensors and plain containers ({detail.strip()[:160]})"
        ) from None
    except Exception as e:  # noqa: BLE001 - a hostile stream can fail torch's reader in open-ended ways (struct.error, ...)
        raise CheckpointError(f"{name}: cannot read torch checkpoint ({str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__})") from None


def resolve_inside(directory: Path, relative: str) -> Path:
    """Join ``relative`` onto ``directory`` and refuse anything that escapes it (``..``, absolute, symlinks).

    One exception: a Hugging Face cache snapshot (``.../snapshots/<rev>/``) holds symlinks into the same
    repo's ``blobs/``; those are allowed, nothing else outside.
    """
    if not isinstance(relative, str) or not relative or os.path.isabs(relative) or "\x00" in relative:
        raise UnsafeCheckpointError(f"refused path {relative!r} in {directory.name}: must be a file name inside the directory")
    try:
        target = (directory / relative).resolve()
        root = directory.resolve()
    except (OSError, RuntimeError) as e:  # symlink loops
        raise UnsafeCheckpointError(f"refused path {relative!r} in {directory.name}: cannot resolve ({e})") from None
    roots = [root]
    if root.parent.name == "snapshots":
        roots.append(root.parent.parent / "blobs")
    lexical = os.path.normpath(relative)
    if lexical == os.curdir or lexical.split(os.sep)[0] == os.pardir or not any(r in target.parents for r in roots):
        raise UnsafeCheckpointError(f"refused path {relative!r} in {directory.name}: it points outside the directory")
    return target


def read_json(path: Path) -> Any:
    if path.exists() and _check_regular(path) > MAX_JSON_BYTES:
        raise CheckpointError(f"{path.name}: {path.stat().st_size} bytes is too large for a JSON config")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path.name}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path.name}: cannot read ({e})") from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path.name}: not valid JSON ({str(e)[:120]})") from None
