"""Streaming, sharded, atomic safetensors output: a model directory that ``from_pretrained`` loads.

The writer never holds more than the tensor (or row chunk) it is handed. Shard sizes and every byte
offset are planned up front from names, shapes and dtypes (``huggingface_hub``'s greedy split, the
``save_pretrained`` file names), so each shard's header is written first and tensors stream after it.
Unchanged tensors can be copied file-to-file in the kernel (``copy_file_range``) without passing
through Python.

Everything goes into a temporary sibling directory. ``commit`` re-reads every shard header and checks
names, shapes, dtypes and byte ranges against the plan, then renames the directory into place (an
atomic exchange with ``--force``). Any error -- a full disk included -- removes the temporary directory;
a killed process leaves only a hidden ``.OUT.qvl-tmp-*`` directory, never a complete-looking OUT, and
the next run clears it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

import torch

from ..errors import QvlError, WriteError
from .checksums import CHECKSUM_NAME, write_manifest
from .outputs import check_output, install_dir, os_error_text, temp_dir_for
from .dtypes import SAFETENSORS_NAMES, name_of
from .safety import read_safetensors_header
from .shards import ShardPlan, TensorSpec, header_bytes
from .sink import open_sink

__all__ = ["CheckpointWriter", "CHECKSUM_NAME"]



def _as_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class CheckpointWriter:
    """Write a planned model directory into a temp sibling of ``out``; :meth:`commit` verifies and renames.

    Use as a context manager. Tensors must arrive in ``plan.order``: :meth:`write` (a whole tensor),
    :meth:`write_rows` (row chunks, concatenated), :meth:`copy_range` (raw bytes from another file).
    """

    def __init__(
        self,
        out: str | Path,
        plan: ShardPlan,
        *,
        inputs: Iterable[str | Path] = (),
        force: bool = False,
        fsync: bool = False,
        checksum: bool = False,
        direct: bool = False,
    ):
        self.inputs = [Path(p) for p in inputs if p is not None]
        self.force = force
        self.out = check_output(out, self.inputs, force)
        self.plan = plan
        self.fsync = fsync
        self.checksum = checksum
        self.direct = direct  # shard bytes bypass the page cache (sink.DirectSink) where the filesystem allows
        self.direct_used = False
        self.tmp: Path | None = None
        self.committed = False
        self.files_written: list[str] = []
        self.bytes_written = 0
        self._order = [(fname, spec) for fname, specs in plan.shards for spec in specs]
        self._next = 0
        self._file = None
        self._fname: str | None = None
        self._remaining = 0  # bytes still owed for the tensor being written
        self._current: TensorSpec | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------
    def __enter__(self) -> "CheckpointWriter":
        try:
            self.tmp = temp_dir_for(self.out)
        except OSError as e:
            raise self._error(e) from None
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self._close_file()
        else:  # leaving on an error: drop the shard being written, flush nothing more
            self._drop_file()
        if not self.committed:
            self.abort()
        if isinstance(exc, OSError):
            raise self._error(exc) from None

    def abort(self) -> None:
        """Drop everything written so far."""
        self._drop_file()
        if self.tmp is not None and self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _error(self, e: OSError) -> WriteError:
        return WriteError(f"cannot write {self.out}: {os_error_text(e)}; nothing was written to {self.out.name}")

    # -- tensors ---------------------------------------------------------------------------------------------
    @property
    def pending(self) -> list[TensorSpec]:
        return [spec for _, spec in self._order[self._next:]]

    def _start(self, name: str) -> TensorSpec:
        if self.tmp is None:
            raise RuntimeError("CheckpointWriter used outside its context")
        if self._remaining:
            raise RuntimeError(f"tensor {self._current.name!r} is incomplete ({self._remaining} bytes missing)")
        if self._next >= len(self._order):
            raise RuntimeError(f"tensor {name!r} is not in the plan (all planned tensors are written)")
        fname, spec = self._order[self._next]
        if spec.name != name:
            raise RuntimeError(f"tensor {name!r} written out of order (expected {spec.name!r})")
        if fname != self._fname:
            self._close_file()
            specs = dict(self.plan.shards)[fname]
            self._file = open_sink(self.tmp / fname, self.direct)
            self._fname = fname
            self.files_written.append(fname)
            self._emit(header_bytes(specs, self.plan.metadata), count=False)
        self._next += 1
        self._current, self._remaining = spec, spec.nbytes
        return spec

    def _emit(self, data: memoryview | bytes, count: bool = True) -> None:
        view = memoryview(data).cast("B")
        if count:
            if len(view) > self._remaining:
                raise RuntimeError(f"tensor {self._current.name!r}: more bytes than its shape and dtype hold")
            self._remaining -= len(view)
            self.bytes_written += len(view)
        self._file.write(view)

    def _check(self, spec: TensorSpec, t: torch.Tensor, rows: bool = False) -> None:
        if t.dtype != spec.dtype:
            raise RuntimeError(f"tensor {spec.name!r}: dtype {t.dtype} but planned {spec.dtype}")
        if not rows and tuple(t.shape) != spec.shape:
            raise RuntimeError(f"tensor {spec.name!r}: shape {tuple(t.shape)} but planned {spec.shape}")
        if rows and tuple(t.shape[1:]) != spec.shape[1:]:
            raise RuntimeError(f"tensor {spec.name!r}: row chunk {tuple(t.shape)} does not fit {spec.shape}")

    def _end(self) -> None:
        if self._remaining:
            raise RuntimeError(f"tensor {self._current.name!r}: {self._remaining} bytes short of its planned size")
        self._current = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """One whole tensor (shape and dtype must match the plan)."""
        spec = self._start(name)
        self._check(spec, tensor)
        self._emit(_as_bytes(tensor))
        self._end()

    def write_rows(self, name: str, chunks: Iterable[torch.Tensor]) -> None:
        """A tensor given as consecutive row chunks along dim 0."""
        self.begin(name)
        for chunk in chunks:
            self.write_chunk(chunk)
        self.end()

    def begin(self, name: str) -> None:
        """Start a tensor written piecewise with :meth:`write_chunk` and closed by :meth:`end`."""
        self._start(name)

    def write_chunk(self, chunk: torch.Tensor) -> None:
        self._check(self._current, chunk, rows=True)
        self._emit(_as_bytes(chunk))

    def end(self) -> None:
        self._end()

    def copy_range(self, name: str, src: str | Path, offset: int, nbytes: int) -> None:
        """Raw bytes of one tensor from another file (same dtype and layout), file to file in the kernel."""
        spec = self._start(name)
        if nbytes != spec.nbytes:
            raise RuntimeError(f"tensor {name!r}: source holds {nbytes} bytes, plan needs {spec.nbytes}")
        self._copy_bytes(Path(src), offset, nbytes)
        self._end()

    def _copy_bytes(self, src: Path, offset: int, nbytes: int) -> None:
        self._remaining -= nbytes
        self.bytes_written += nbytes
        self._file.copy_from(src, offset, nbytes)

    def _drop_file(self) -> None:
        if self._file is not None:
            f, self._file = self._file, None
            f.discard()

    def _close_file(self) -> None:
        if self._file is not None:
            f, self._file = self._file, None
            f.close(self.fsync)
            self.direct_used = self.direct_used or f.direct  # still direct after the last write: it went past the cache

    # -- other files -----------------------------------------------------------------------------------------
    def copy_file(self, src: str | Path, name: str | None = None) -> None:
        shutil.copyfile(src, self.tmp / (name or Path(src).name))

    def write_json(self, name: str, obj: Any, *, sort_keys: bool = False) -> None:
        (self.tmp / name).write_text(json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n", encoding="utf-8")

    # -- commit ----------------------------------------------------------------------------------------------
    def verify(self) -> None:
        """Re-open every written shard header and compare it with the plan (names, shapes, dtypes, bytes)."""
        if self._next != len(self._order) or self._remaining:
            missing = [spec.name for _, spec in self._order[self._next:]]
            raise WriteError(f"{len(missing)} planned tensors were never written, e.g. {missing[0] if missing else self._current.name!r}")
        for fname, specs in self.plan.shards:
            path = self.tmp / fname
            try:
                header, metadata = read_safetensors_header(path)
            except QvlError as e:
                raise WriteError(f"verification of {fname} failed: {e}") from None
            want = {s.name: s for s in specs}
            if set(header) != set(want):
                odd = sorted(set(header) ^ set(want))
                raise WriteError(f"verification of {fname} failed: tensor names differ from the plan, e.g. {odd[0]!r}")
            for name, info in header.items():
                spec = want[name]
                start, end = info["data_offsets"]
                if SAFETENSORS_NAMES[info["dtype"]] != name_of(spec.dtype) or tuple(info["shape"]) != spec.shape or end - start != spec.nbytes:
                    raise WriteError(f"verification of {fname} failed: tensor {name!r} does not match the plan")
            if metadata != self.plan.metadata:
                raise WriteError(f"verification of {fname} failed: metadata differs")
        index = self.plan.index()
        if index is not None:
            on_disk = json.loads((self.tmp / self.plan.index_name()).read_text(encoding="utf-8"))
            if on_disk != index:
                raise WriteError(f"verification of {self.plan.index_name()} failed")

    def commit(self) -> Path:
        """Write the index, verify, and move the directory into place."""
        try:
            self._close_file()
            for fname, specs in self.plan.shards:
                if not specs and fname not in self.files_written:  # an empty model/adapter: header only
                    (self.tmp / fname).write_bytes(header_bytes((), self.plan.metadata))
                    self.files_written.append(fname)
            index = self.plan.index()
            if index is not None:
                self.write_json(self.plan.index_name(), index, sort_keys=True)
            self.verify()
            if self.checksum:
                write_manifest(self.tmp)
            if self.fsync:
                for p in self.tmp.iterdir():
                    fd = os.open(p, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
            # the inputs may have been swapped for links into OUT while we wrote: check again
            check_output(self.out, self.inputs, force=True)
            self._install()
        except OSError as e:
            self.abort()
            raise self._error(e) from None
        except BaseException:
            self.abort()
            raise
        self.committed = True
        return self.out

    def _install(self) -> None:
        install_dir(self.tmp, self.out, self.force)
        self.tmp = None
