"""A real Hugging Face cache entry built offline with huggingface_hub's own cache-writing helpers (the
ones hf_hub_download uses after a download): blobs named by content hash, snapshot symlinks, refs/<rev>."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from huggingface_hub import constants
from huggingface_hub.file_download import _cache_commit_hash_for_specific_revision, _create_symlink, _get_pointer_path, repo_folder_name

__all__ = ["add_to_cache"]


def add_to_cache(cache_dir: Path, repo_id: str, source_dir: Path, *, revision: str = "main", commit: str | None = None) -> str:
    """Put every file under ``source_dir`` into ``cache_dir`` as ``repo_id`` at ``revision``; returns the commit."""
    commit = commit or hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    storage = os.path.join(str(cache_dir), repo_folder_name(repo_id=repo_id, repo_type=constants.REPO_TYPE_MODEL))
    os.makedirs(os.path.join(storage, "blobs"), exist_ok=True)
    for f in sorted(p for p in Path(source_dir).rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = os.path.join(storage, "blobs", hashlib.sha256(data).hexdigest())
        Path(blob).write_bytes(data)
        pointer = _get_pointer_path(storage, commit, f.relative_to(source_dir).as_posix())
        os.makedirs(os.path.dirname(pointer), exist_ok=True)
        _create_symlink(blob, pointer, new_blob=False)
    _cache_commit_hash_for_specific_revision(storage, revision, commit)
    return commit
