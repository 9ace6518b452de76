"""What a path argument names: a checkpoint, a run directory, or a Hugging Face repo id.

Every command's inputs (SRC, ``--base``, diff's A and B) go through :func:`resolve_source`, so they all accept
the same things:

- a file or checkpoint dir: itself;
- a run dir (``checkpoint-N/`` subdirs): its newest complete checkpoint (see :mod:`.run_dir`);
- ``org/name[@revision]`` that is not a local path: the snapshot in the local Hugging Face cache, through
  ``huggingface_hub`` (``local_files_only`` unless ``download``), then again as above (a hub repo can be a
  run dir too).

The library never prints: the returned :class:`Source` says what was picked, the CLI shows it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError
from .run_dir import is_run_dir, newest_complete

__all__ = ["Source", "resolve_source", "parse_repo_id", "hub_snapshot"]

# huggingface_hub's repo-id rule (validate_repo_id): org/name of [\w.-], no "--" or "..", optional @revision
_REPO = re.compile(r"^(?P<repo>[\w][\w.-]{0,95}/[\w][\w.-]{0,95})(?:@(?P<rev>[\w./-]{1,200}))?$")


@dataclass(frozen=True)
class Source:
    given: str
    path: Path
    note: str | None = None  # what was resolved, for the user ("run dir X: using checkpoint-30 (step 30)")
    repo_id: str | None = None
    revision: str | None = None


def parse_repo_id(text: str) -> tuple[str, str | None] | None:
    """``org/name[@rev]`` -> (repo, rev); None when the text cannot be a repo id."""
    m = _REPO.match(text)
    if not m or "--" in m.group("repo") or ".." in m.group("repo") or m.group("repo").endswith((".", "-")):
        return None
    return m.group("repo"), m.group("rev")


def hub_snapshot(repo: str, rev: str | None, download: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, revision=rev, local_files_only=not download))
    except LocalEntryNotFoundError:
        where = f"{repo}@{rev}" if rev else repo
        raise CheckpointError(f"{where}: no such path, and not in the local Hugging Face cache (pass --download to fetch it)") from None
    except HFValidationError as e:
        raise CheckpointError(f"{repo}: not a valid Hugging Face repo id ({e})") from None
    except Exception as e:  # network / auth errors with --download
        raise CheckpointError(f"{repo}: cannot fetch from the Hugging Face Hub ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def resolve_source(arg: str | Path, *, download: bool = False) -> Source:
    """Resolve one path argument (see the module docstring). Raises CheckpointError when it names nothing."""
    given = str(arg)
    path = Path(arg)
    notes: list[str] = []
    repo = rev = None
    if not path.exists():
        parsed = parse_repo_id(given)
        if parsed is None:
            raise CheckpointError(f"{given}: no such file or directory")
        repo, rev = parsed
        path = hub_snapshot(repo, rev, download)
        notes.append(f"{given}: Hugging Face cache snapshot {path.name[:12]}")
    if is_run_dir(path):
        info, skipped = newest_complete(path)
        step = f"step {info.step}" if info.step is not None else "no trainer_state.json"
        what = f"run dir: using {info.name} ({step}), the newest complete checkpoint"
        if skipped:
            what += "; skipped " + ", ".join(f"{i.name} ({i.problems[0]})" for i in skipped)
        notes.append(f"{given}: {what}")
        path = info.path
    return Source(given, path, "; ".join(notes) or None, repo, rev)
