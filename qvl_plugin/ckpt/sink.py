"""Where a shard's bytes go: the page cache (``write`` / in-kernel ``copy_file_range``), or the device directly.

A merge writes every byte of a model once and never reads it back. Through the page cache each new page
is allocated, filled and later written back, and past the dirty limit the writer is throttled to the disk
anyway; on VMs whose fresh guest pages fault on the host the allocation alone runs at 0.3-0.6 GB/s
(measured, README). :class:`DirectSink` sends whole aligned blocks with ``O_DIRECT`` through one reused,
page-aligned staging buffer (one memory copy, no page cache) and writes the unaligned tail through the
page cache at close. Filesystems without ``O_DIRECT`` (tmpfs, some network and FUSE mounts) refuse it at
open or at the first write: the sink then carries on through the page cache, from the same offset.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
from pathlib import Path

__all__ = ["Sink", "DirectSink", "open_sink", "takes_o_direct"]

_COPY_BLOCK = 64 << 20
_STAGING = 16 << 20  # bytes per direct write: large enough to keep the device busy, small enough to stay cached
_ALIGN = 4096  # O_DIRECT wants offsets, lengths and addresses aligned to the logical block size (<= 4096)
_REFUSED = (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP)  # what a filesystem without O_DIRECT answers


def _write_all(fd: int, view: memoryview) -> None:
    while len(view):
        view = view[os.write(fd, view):]


class Sink:
    """A new file written front to back through the page cache."""

    direct = False

    def __init__(self, path: Path, fd: int | None = None) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666) if fd is None else fd

    def write(self, data: memoryview) -> None:
        _write_all(self.fd, memoryview(data).cast("B"))

    def copy_from(self, src: Path, offset: int, nbytes: int) -> None:
        """``nbytes`` of ``src`` from ``offset``, file to file in the kernel where it can."""
        with open(src, "rb", buffering=0) as f:
            done = 0
            if hasattr(os, "copy_file_range"):
                try:
                    while done < nbytes:
                        n = os.copy_file_range(f.fileno(), self.fd, min(nbytes - done, 1 << 30), offset + done)
                        if n == 0:
                            raise OSError(errno.EIO, f"{src.name} ended early")
                        done += n
                    return
                except OSError as e:
                    if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EBADF):
                        raise
            buf = memoryview(bytearray(min(_COPY_BLOCK, max(nbytes - done, 1))))
            while done < nbytes:
                n = os.preadv(f.fileno(), [buf[: min(len(buf), nbytes - done)]], offset + done)
                if n == 0:
                    raise OSError(errno.EIO, f"{src.name} ended early")
                _write_all(self.fd, buf[:n])
                done += n

    def close(self, fsync: bool = False) -> None:
        try:
            if fsync:
                os.fsync(self.fd)
        finally:
            os.close(self.fd)

    def discard(self) -> None:
        """Close without writing what is still buffered (the output is being removed after an error)."""
        os.close(self.fd)


class DirectSink(Sink):
    """Whole ``_ALIGN`` blocks go to the device with ``O_DIRECT`` from a page-aligned staging buffer.
    ``direct`` turns False if the filesystem refused the first direct write."""

    direct = True

    def __init__(self, path: Path) -> None:
        super().__init__(path, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o666))
        self.buf = mmap.mmap(-1, _STAGING)  # anonymous maps are page-aligned
        self.view = memoryview(self.buf)
        self.fill = 0  # staged bytes, not yet written
        self.flushed = 0  # bytes of the file written so far

    def _flush(self, upto: int) -> None:
        """Write ``view[:upto]`` (a multiple of ``_ALIGN``) and keep the rest at the buffer's front."""
        try:
            _write_all(self.fd, self.view[:upto])
        except OSError as e:  # accepted at open, refused at a write: go on through the page cache
            if not self.direct or e.errno not in _REFUSED:
                raise
            self._cached()
            self.direct = False
            done = os.lseek(self.fd, 0, os.SEEK_CUR) - self.flushed  # what the refused call's loop got out
            _write_all(self.fd, self.view[done:upto])
        self.flushed += upto
        rest = self.fill - upto
        if rest:
            self.view[:rest] = self.view[upto: self.fill]
        self.fill = rest

    def _cached(self) -> None:
        """Clear ``O_DIRECT`` on the open file: later writes go through the page cache, at the same offset."""
        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)

    def write(self, data: memoryview) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            n = min(len(view), _STAGING - self.fill)
            self.view[self.fill: self.fill + n] = view[:n]
            self.fill += n
            view = view[n:]
            if self.fill == _STAGING:
                self._flush(_STAGING)

    def copy_from(self, src: Path, offset: int, nbytes: int) -> None:
        """Read straight into the staging buffer (the source comes from the page cache; one copy)."""
        with open(src, "rb", buffering=0) as f:
            done = 0
            while done < nbytes:
                want = min(_STAGING - self.fill, nbytes - done)
                n = os.preadv(f.fileno(), [self.view[self.fill: self.fill + want]], offset + done)
                if n == 0:
                    raise OSError(errno.EIO, f"{src.name} ended early")
                self.fill += n
                done += n
                if self.fill == _STAGING:
                    self._flush(_STAGING)

    def close(self, fsync: bool = False) -> None:
        try:
            whole = self.fill - self.fill % _ALIGN
            if whole:
                self._flush(whole)
            if self.fill:  # the unaligned tail, through the page cache
                self._cached()
                _write_all(self.fd, self.view[: self.fill])
                self.fill = 0
        finally:
            self._release()
            super().close(fsync)

    def discard(self) -> None:
        self.fill = 0
        self._release()
        super().discard()

    def _release(self) -> None:
        try:
            self.view.release()
            self.buf.close()
        except BufferError:  # a traceback still holds a slice of the buffer: the map goes when it does
            pass


def open_sink(path: Path, direct: bool) -> Sink:
    """A :class:`DirectSink` where asked for and the filesystem takes ``O_DIRECT``, else a :class:`Sink`."""
    if direct and hasattr(os, "O_DIRECT"):
        try:
            return DirectSink(path)
        except OSError as e:
            if e.errno not in _REFUSED:
                raise
    return Sink(path)


def takes_o_direct(directory: Path) -> bool:
    """Does the filesystem of ``directory`` open files with ``O_DIRECT``? (A probe file, removed.)"""
    if not hasattr(os, "O_DIRECT"):
        return False
    probe = Path(directory) / ".qvl-o-direct-probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600))
    except OSError:
        return False
    probe.unlink(missing_ok=True)
    return True
