"""Where an output may go, and how it gets there atomically.

Everything is written into a hidden temporary sibling (``.OUT.qvl-tmp-PID-*``) and renamed into place only
when complete (an atomic exchange with ``--force``). A killed process leaves only that hidden sibling,
never a complete-looking OUT, and the next run clears it. An OUT that is, contains or lies inside an input
is refused.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

from ..errors import UsageError, WriteError
from .checksums import CHECKSUM_NAME

__all__ = ["check_output", "is_weight_file", "support_files", "temp_dir_for", "install_dir", "atomic_file", "os_error_text",
           "TMP_MARK", "current_umask", "normal_mode"]

TMP_MARK = ".qvl-tmp-"


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
    prefix = f".{out.name}{TMP_MARK}"
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


def os_error_text(e: OSError) -> str:
    return "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e))


def current_umask() -> int:
    """The process umask, read without changing it where Linux shows it (``/proc/self/status``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: the classic swap (briefly process-wide)
    os.umask(mask)
    return mask


def normal_mode(path: Path, directory: bool) -> None:
    """Give ``path`` what a plain ``mkdir``/``open(..., "w")`` would under the caller's umask: the temp
    names are created private (0700/0600), and a rename keeps that mode, so a merged model would otherwise
    be unreadable to other users and serving containers."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def temp_dir_for(out: Path) -> Path:
    """A fresh hidden sibling of ``out`` to write into (stale ones from killed runs are removed first),
    with the permissions a plain ``mkdir`` would give it (it becomes OUT by a rename)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{TMP_MARK}{os.getpid()}-", dir=out.parent))
    normal_mode(tmp, directory=True)
    return tmp


def install_dir(tmp: Path, out: Path, force: bool) -> None:
    """Rename the finished ``tmp`` to ``out``: never over an existing OUT unless ``force`` (then an atomic
    exchange where the kernel has one, and the old OUT removed)."""
    if not os.path.lexists(out):
        try:
            done = _renameat2(tmp, out, _RENAME_NOREPLACE)
        except FileExistsError:
            raise UsageError(f"output {out} appeared while writing (another run?); nothing was replaced") from None
        if not done:
            if os.path.lexists(out):
                raise UsageError(f"output {out} appeared while writing (another run?); nothing was replaced")
            os.rename(tmp, out)
        return
    if not force:
        raise UsageError(f"output {out} appeared while writing (another run?); nothing was replaced")
    if _renameat2(tmp, out, _RENAME_EXCHANGE):  # atomic swap; tmp now holds the old OUT
        old = tmp
    else:
        old = out.parent / f".{out.name}{TMP_MARK}{os.getpid()}-old"
        os.rename(out, old)
        os.rename(tmp, out)
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
            fd, name = tempfile.mkstemp(prefix=f".{self.out.name}{TMP_MARK}{os.getpid()}-", dir=self.out.parent)
            os.close(fd)
            normal_mode(Path(name), directory=False)
        except OSError as e:
            raise WriteError(f"cannot write {self.out}: {os_error_text(e)}") from None
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
            raise WriteError(f"cannot write {self.out}: {os_error_text(e)}") from None
        finally:
            if self.tmp is not None:
                self.tmp.unlink(missing_ok=True)
        if isinstance(exc, RuntimeError) and isinstance(exc.__context__, OSError):
            exc = exc.__context__  # torch.save wraps the file object's OSError (e.g. ENOSPC)
        if isinstance(exc, OSError):
            raise WriteError(f"cannot write {self.out}: {os_error_text(exc)}") from None
