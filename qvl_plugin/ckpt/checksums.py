"""The ``SHA256SUMS`` manifest: written by ``merge --checksum``, verified by ``audit``.

Same format as ``sha256sum`` (``<hex>  <name>`` per line), so ``sha256sum -c SHA256SUMS`` works too.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..errors import CheckpointError
from .safety import resolve_inside

__all__ = ["CHECKSUM_NAME", "sha256_file", "write_manifest", "verify_manifest"]

CHECKSUM_NAME = "SHA256SUMS"
_BLOCK = 16 * 1024 * 1024


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path) -> Path:
    """Hash every regular file of ``directory`` (except the manifest itself)."""
    lines = [f"{sha256_file(p)}  {p.name}\n" for p in sorted(directory.iterdir()) if p.is_file() and p.name != CHECKSUM_NAME]
    out = directory / CHECKSUM_NAME
    out.write_text("".join(lines), encoding="utf-8")
    return out


def verify_manifest(directory: Path) -> list[str] | None:
    """Names whose bytes differ from the manifest (or are missing); None when there is no manifest."""
    manifest = directory / CHECKSUM_NAME
    if not manifest.is_file():
        return None
    bad: list[str] = []
    try:
        lines = manifest.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{CHECKSUM_NAME}: cannot read ({e})") from None
    for line in lines:
        if not line.strip():
            continue
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64:
            raise CheckpointError(f"{CHECKSUM_NAME}: malformed line {line[:80]!r}")
        path = resolve_inside(directory, name.lstrip("*"))
        if not path.is_file() or sha256_file(path) != digest.lower():
            bad.append(name)
    return bad
