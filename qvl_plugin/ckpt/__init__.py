"""Checkpoint tooling: the lazy view and the operations built on it."""

from .view import Checkpoint, Entry, Finding, Role, open_checkpoint

__all__ = ["Checkpoint", "Entry", "Finding", "Role", "open_checkpoint"]
