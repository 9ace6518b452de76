"""Typed errors. The library raises these; the CLI prints them as one line and exits 1."""

from __future__ import annotations

__all__ = ["QvlError", "CheckpointError", "UnsafeCheckpointError", "AdapterConfigError", "UsageError", "WriteError"]


class QvlError(Exception):
    """A problem the user can fix: bad input, refused file, impossible request."""


class CheckpointError(QvlError):
    """A checkpoint cannot be opened or does not have the expected structure."""


class UnsafeCheckpointError(CheckpointError):
    """A file that would need code execution or lies about its own structure."""


class AdapterConfigError(CheckpointError):
    """adapter_config.json is missing, malformed, or describes something we cannot apply."""


class UsageError(QvlError):
    """Arguments that cannot work together (e.g. OUT inside an input)."""


class WriteError(QvlError):
    """The output could not be written (disk full, permissions, verification failed)."""
