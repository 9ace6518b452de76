"""Reading stored tensors whole or by rows: ``pread`` from safetensors byte ranges, else the view's loader.

Merge, convert and extract read through this so that a tensor is never copied twice and big tensors can
be processed row chunk by row chunk (bounded memory).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from ..errors import CheckpointError
from . import merge_math as mm
from .view import Checkpoint, Entry

__all__ = ["TensorReader", "CHUNK_ELEMENTS", "all_finite_rows", "equal_rows"]

CHUNK_ELEMENTS = 1 << 21  # elements per row chunk: ~24 MB of buffers, small enough to stay in cache


class TensorReader:
    """Reads stored tensors whole or by rows without the view's whole-tensor copy.

    For safetensors files it knows each tensor's byte range (from the validated header) and reads rows
    with ``pread`` into a fresh buffer; other formats fall back to ``Entry.load`` (mmap'd pickles).
    """

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self._fds: dict[Path, int] = {}

    @staticmethod
    def location(entry: Entry) -> tuple[Path, int] | None:
        return entry.location

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def rows(self, entry: Entry, start: int, stop: int, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``start:stop`` (dim 0) in the stored dtype: a new tensor, or a view of ``buffer`` (uint8, reused)."""
        loc = self.location(entry)
        if loc is None:
            return entry.load()[start:stop]
        path, offset = loc
        row_elems = math.prod(entry.shape[1:]) if len(entry.shape) > 1 else 1
        itemsize = entry.dtype.itemsize
        shape = (stop - start,) + tuple(entry.shape[1:]) if entry.shape else ()
        nbytes = math.prod(shape) * itemsize
        if buffer is not None and buffer.numel() >= nbytes:
            out = buffer[:nbytes].view(entry.dtype).view(shape)
        else:
            out = torch.empty(shape, dtype=entry.dtype)
        want = out.numel() * itemsize
        if want:
            view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
            fd, pos, done = self._fd(path), offset + start * row_elems * itemsize, 0
            while done < want:
                n = os.preadv(fd, [view[done:]], pos + done)
                if n == 0:
                    raise CheckpointError(f"{path.name}: file ended inside tensor {entry.key!r}")
                done += n
        return out

    def whole(self, entry: Entry) -> torch.Tensor:
        if not entry.shape:
            t = entry.load()
            return t.clone() if self.location(entry) is None else t
        return self.rows(entry, 0, entry.shape[0])

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def all_finite_rows(reader: TensorReader, e: Entry) -> bool:
    if not e.dtype.is_floating_point:
        return True
    if len(e.shape) < 2:
        return mm.all_finite(reader.whole(e))
    step = max(1, CHUNK_ELEMENTS // max(1, math.prod(e.shape[1:])))
    return all(mm.all_finite(reader.rows(e, i, min(e.shape[0], i + step))) for i in range(0, e.shape[0], step))


def equal_rows(reader: TensorReader, x: Entry, y: Entry, y_reader: TensorReader | None = None) -> bool:
    """Bit-equal tensors, compared row chunk by row chunk (never whole); ``y`` may live in another checkpoint."""
    yr = y_reader or reader
    if x.shape != y.shape or x.dtype != y.dtype:
        return False
    if len(x.shape) < 2:
        return torch.equal(reader.whole(x), yr.whole(y))
    step = max(1, CHUNK_ELEMENTS // max(1, math.prod(x.shape[1:])))
    return all(torch.equal(reader.rows(x, i, min(x.shape[0], i + step)), yr.rows(y, i, min(y.shape[0], i + step))) for i in range(0, x.shape[0], step))
