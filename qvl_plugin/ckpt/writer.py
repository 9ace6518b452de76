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

import ctypes
import ctypes.util
import errno
import math
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from ..errors import QvlError, UsageError
from .checksums import CHECKSUM_NAME, write_manifest
from .safety import SAFETENSORS_DTYPES, read_safetensors_header

__all__ = [
    "WriteError",
    "TensorSpec",
    "ShardPlan",
    "parse_size",
    "plan_shards",
    "check_output",
    "is_weight_file",
    "support_files",
    "CheckpointWriter",
    "SAFE_WEIGHTS_NAME",
    "SAFE_WEIGHTS_INDEX_NAME",
    "CHECKSUM_NAME",
    "atomic_file",
]

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_DTYPE_NAMES = {dt: name for name, dt in SAFETENSORS_DTYPES.items()}
_TMP_MARK = ".qvl-tmp-"
_COPY_BLOCK = 64 << 20


class WriteError(QvlError):
    """The output could not be written (disk full, permissions, verification failed)."""


# --------------------------------------------------------------------------------------------------------------
# The plan


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


def _header_bytes(specs: Sequence[TensorSpec], metadata: dict[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    pos = 0
    for spec in specs:
        header[spec.name] = {"dtype": _DTYPE_NAMES[spec.dtype], "shape": list(spec.shape), "data_offsets": [pos, pos + spec.nbytes]}
        pos += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes so the data is aligned
    return len(raw).to_bytes(8, "little") + raw


# --------------------------------------------------------------------------------------------------------------
# Where the output may go


def _real(p: str | Path) -> Path:
    return Path(os.path.realpath(p))


def check_output(out: str | Path, inputs: Iterable[str | Path] = (), force: bool = False) -> Path:
    """Refuse an OUT that is an input, lies inside one, contains one, or exists (unless ``force``)."""
    out = Path(out).absolute()
    real_out = _real(out)
    for item in inputs:
        if item is None:
            continue
        real_in = _real(item)
        if real_out == real_in:
            raise UsageError(f"output {out} is the input {item}; choose another directory")
        if real_in in real_out.parents:
            raise UsageError(f"output {out} lies inside the input {item}; choose a directory outside it")
        if real_out in real_in.parents:
            raise UsageError(f"output {out} contains the input {item}; replacing it would destroy the input")
    if os.path.lexists(out) and not force:
        raise UsageError(f"output {out} already exists (pass --force to replace it)")
    return out


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".pdparams")
_NOT_COPIED = ("adapter_config.json", CHECKSUM_NAME)


def is_weight_file(name: str) -> bool:
    """Weights (any framework) and their indexes: the merge writes its own, stale copies must not travel."""
    low = name.lower()
    return low.endswith(_WEIGHT_SUFFIXES) or low.endswith(".index.json") or ".safetensors" in low or low.startswith("adapter_model")


def support_files(directory: str | Path) -> tuple[list[Path], list[str]]:
    """The base's non-weight files to carry over (config, generation config, tokenizer*, processor,
    chat template, remote-code ``*.py``, README, ...) and the names skipped (sub-directories, hidden)."""
    directory = Path(directory)
    files, skipped = [], []
    if not directory.is_dir():
        return files, skipped
    for p in sorted(directory.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir():
            skipped.append(p.name + "/")
        elif p.is_file() and not is_weight_file(p.name) and p.name not in _NOT_COPIED:
            files.append(p)
    return files, skipped


# --------------------------------------------------------------------------------------------------------------
# Renames: no-replace and exchange when the kernel has them

_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """True when done; False when renameat2 is unavailable (caller falls back)."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    try:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(out: Path) -> None:
    """Remove temp dirs a killed earlier run left next to OUT (their process is gone)."""
    prefix = f".{out.name}{_TMP_MARK}"
    try:
        candidates = list(out.parent.iterdir())
    except OSError:
        return
    for p in candidates:
        if not p.name.startswith(prefix):
            continue
        m = re.match(r"(\d+)-", p.name[len(prefix):])
        if m and not _pid_alive(int(m.group(1))):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:  # a killed single-file write (convert --to pth)
                p.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------------------
# The writer


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
    ):
        self.inputs = [Path(p) for p in inputs if p is not None]
        self.force = force
        self.out = check_output(out, self.inputs, force)
        self.plan = plan
        self.fsync = fsync
        self.checksum = checksum
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
            self.out.parent.mkdir(parents=True, exist_ok=True)
            _clean_stale(self.out)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}{_TMP_MARK}{os.getpid()}-", dir=self.out.parent))
        except OSError as e:
            raise self._error(e) from None
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._close_file()
        if not self.committed:
            self.abort()
        if isinstance(exc, OSError):
            raise self._error(exc) from None

    def abort(self) -> None:
        """Drop everything written so far."""
        self._close_file()
        if self.tmp is not None and self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _error(self, e: OSError) -> WriteError:
        what = e.strerror or str(e)
        if e.errno == errno.ENOSPC:
            what = "no space left on device"
        return WriteError(f"cannot write {self.out}: {what}; nothing was written to {self.out.name}")

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
            self._file = open(self.tmp / fname, "wb", buffering=0)
            self._fname = fname
            self.files_written.append(fname)
            self._emit(_header_bytes(specs, self.plan.metadata), count=False)
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
        while len(view):
            n = self._file.write(view)
            view = view[n:]

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
        with open(src, "rb", buffering=0) as f:
            fd_in, fd_out = f.fileno(), self._file.fileno()
            done = 0
            if hasattr(os, "copy_file_range"):
                try:
                    while done < nbytes:
                        n = os.copy_file_range(fd_in, fd_out, min(nbytes - done, 1 << 30), offset + done)
                        if n == 0:
                            raise OSError(errno.EIO, f"{src.name} ended early")
                        done += n
                    return
                except OSError as e:
                    if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EBADF):
                        raise
            buf = bytearray(min(_COPY_BLOCK, max(nbytes - done, 1)))
            view = memoryview(buf)
            while done < nbytes:
                want = min(len(buf), nbytes - done)
                n = os.preadv(fd_in, [view[:want]], offset + done)
                if n == 0:
                    raise OSError(errno.EIO, f"{src.name} ended early")
                out = view[:n]
                while len(out):
                    out = out[self._file.write(out):]
                done += n

    def _close_file(self) -> None:
        if self._file is not None:
            try:
                if self.fsync:
                    os.fsync(self._file.fileno())
            finally:
                self._file.close()
                self._file = None

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
                if SAFETENSORS_DTYPES[info["dtype"]] != spec.dtype or tuple(info["shape"]) != spec.shape or end - start != spec.nbytes:
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
                    (self.tmp / fname).write_bytes(_header_bytes((), self.plan.metadata))
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
        tmp, out = self.tmp, self.out
        if not os.path.lexists(out):
            try:
                done = _renameat2(tmp, out, _RENAME_NOREPLACE)
            except FileExistsError:
                raise UsageError(f"output {out} appeared while writing (another run?); nothing was replaced") from None
            if not done:
                if os.path.lexists(out):
                    raise UsageError(f"output {out} appeared while writing (another run?); nothing was replaced")
                os.rename(tmp, out)
            self.tmp = None
            return
        if not self.force:
            raise UsageError(f"output {out} appeared while writing (another run?); nothing was replaced")
        if _renameat2(tmp, out, _RENAME_EXCHANGE):  # atomic swap; tmp now holds the old OUT
            old = tmp
        else:
            old = out.parent / f".{out.name}{_TMP_MARK}{os.getpid()}-old"
            os.rename(out, old)
            os.rename(tmp, out)
        self.tmp = None
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


class atomic_file:
    """Write one output file atomically: ``with atomic_file(out, inputs, force) as tmp: ...write tmp...``.

    The temp file sits next to OUT and is renamed over it only when the block succeeds.
    """

    def __init__(self, out: str | Path, inputs: Iterable[str | Path] = (), force: bool = False):
        self.inputs = [Path(p) for p in inputs if p is not None]
        self.force = force
        self.out = check_output(out, self.inputs, force)
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            _clean_stale(self.out)
            fd, name = tempfile.mkstemp(prefix=f".{self.out.name}{_TMP_MARK}{os.getpid()}-", dir=self.out.parent)
            os.close(fd)
        except OSError as e:
            raise WriteError(f"cannot write {self.out}: {e.strerror or e}") from None
        self.tmp = Path(name)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                check_output(self.out, self.inputs, force=True)
                if os.path.lexists(self.out) and not self.force:
                    raise UsageError(f"output {self.out} appeared while writing (another run?); nothing was replaced")
                if os.path.isdir(self.out) and not os.path.islink(self.out):
                    raise UsageError(f"output {self.out} is a directory; refusing to replace it with a file")
                os.replace(self.tmp, self.out)
                self.tmp = None
        except OSError as e:
            raise WriteError(f"cannot write {self.out}: {'no space left on device' if e.errno == errno.ENOSPC else e.strerror or e}") from None
        finally:
            if self.tmp is not None:
                self.tmp.unlink(missing_ok=True)
        if isinstance(exc, RuntimeError) and isinstance(exc.__context__, OSError):
            exc = exc.__context__  # torch.save wraps the file object's OSError (e.g. ENOSPC)
        if isinstance(exc, OSError):
            raise WriteError(f"cannot write {self.out}: {'no space left on device' if exc.errno == errno.ENOSPC else exc.strerror or exc}") from None
