"""Trainer output directories: which checkpoints they hold, which are whole, which is the newest.

A HF Trainer / LLaMA-Factory / ms-swift run dir holds ``checkpoint-N/`` subdirs (each an adapter or a full
model plus trainer_state.json), ms-swift also a ``last-checkpoint`` symlink, ``args.json``,
``logging.jsonl`` and ``checkpoint-N-merged/`` exports; LLaMA-Factory also the final adapter at the top.
The step of a checkpoint is trainer_state.json's ``global_step`` (the ``-N`` suffix when it has none).
"Complete" means every weight file is present and parses (safetensors headers cover the file exactly)
and no tensor is empty (a ZeRO-3 save without gathering).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointError
from .formats import detect_format
from .safety import read_json

__all__ = ["CheckpointInfo", "is_run_dir", "list_checkpoints", "newest_complete"]

_CKPT = re.compile(r"^checkpoint-(\d+)$")
_MERGED = re.compile(r"^checkpoint-(\d+)-merged$")
LAST = "last-checkpoint"


@dataclass
class CheckpointInfo:
    path: Path
    name: str
    kind: str  # "checkpoint" | "export" (ms-swift *-merged) | "final" (the run dir's own top-level save)
    step: int | None
    format: str | None = None
    bytes: int = 0
    tensors: int = 0
    problems: list[str] = field(default_factory=list)
    last: bool = False  # what ``last-checkpoint`` points at

    @property
    def complete(self) -> bool:
        return self.format is not None and not self.problems

    def to_dict(self) -> dict:
        return {
            "path": str(self.path), "name": self.name, "kind": self.kind, "step": self.step, "format": self.format,
            "bytes": self.bytes, "tensors": self.tensors, "complete": self.complete, "problems": list(self.problems),
            "last_checkpoint": self.last,
        }


def _is_checkpoint_dir(p: Path) -> bool:
    try:
        detect_format(p)
        return True
    except CheckpointError:
        return False


def is_run_dir(path: Path) -> bool:
    """A directory that is not itself a checkpoint but holds ``checkpoint-N/`` (or ``last-checkpoint``)."""
    if not path.is_dir() or _is_checkpoint_dir(path):
        return False
    return (path / LAST).exists() or any(_CKPT.match(p.name) for p in path.iterdir() if p.is_dir())


def _step(path: Path, fallback: int | None) -> int | None:
    state = path / "trainer_state.json"
    try:
        data = read_json(state) if state.is_file() else None
    except CheckpointError:
        return fallback
    step = data.get("global_step") if isinstance(data, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else fallback


def _health(info: CheckpointInfo, nan: bool) -> None:
    from .merge_math import all_finite
    from .view import open_checkpoint

    try:
        info.format = detect_format(info.path)
    except CheckpointError as e:
        info.problems.append(str(e).replace(f"{info.path}: ", ""))
        return
    try:
        with open_checkpoint(info.path) as ckpt:
            info.tensors = len(ckpt.entries)
            info.bytes = sum(f.stat().st_size for f in ckpt.files)
            empty = [e.key for e in ckpt.entries if e.numel == 0]
            if empty:
                info.problems.append(f"{len(empty)} empty tensors (ZeRO-3 save without gathering)")
            if nan:
                bad = sum(1 for e in ckpt.entries if e.numel and not all_finite(e.load()))
                if bad:
                    info.problems.append(f"{bad} tensors hold NaN/Inf")
    except CheckpointError as e:  # missing shard, truncated file, corrupt header
        info.problems.append(str(e))


def list_checkpoints(run_dir: str | Path, *, nan: bool = False) -> list[CheckpointInfo]:
    """Every checkpoint of a run dir with step, format, size and health; newest first (exports last)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: not a directory")
    last = (run_dir / LAST).resolve() if (run_dir / LAST).exists() else None
    found: list[CheckpointInfo] = []
    for p in sorted(run_dir.iterdir()):
        if not p.is_dir():
            continue
        m, x = _CKPT.match(p.name), _MERGED.match(p.name)
        if p.name == LAST:
            if p.is_symlink() and p.resolve().parent == run_dir.resolve():
                continue  # listed under its target's name
            info = CheckpointInfo(p, p.name, "checkpoint", _step(p, None))
        elif m:
            info = CheckpointInfo(p, p.name, "checkpoint", _step(p, int(m.group(1))))
        elif x:
            info = CheckpointInfo(p, p.name, "export", int(x.group(1)))
        else:
            continue
        info.last = last is not None and p.resolve() == last
        _health(info, nan)
        found.append(info)
    if _is_checkpoint_dir(run_dir):
        top = CheckpointInfo(run_dir, ".", "final", _step(run_dir, None))
        _health(top, nan)
        found.append(top)
    found.sort(key=lambda i: (i.kind == "export", -(i.step if i.step is not None else -math.inf), i.kind != "final", i.name))
    return found


def newest_complete(run_dir: str | Path) -> tuple[CheckpointInfo, list[CheckpointInfo]]:
    """The checkpoint a command uses for a run dir: the complete ``checkpoint-N`` with the highest step
    (``last-checkpoint`` breaks ties); also the newer ones skipped as incomplete."""
    infos = [i for i in list_checkpoints(run_dir) if i.kind == "checkpoint"]
    infos.sort(key=lambda i: (-(i.step if i.step is not None else -1), not i.last))
    skipped = []
    for info in infos:
        if info.complete:
            return info, skipped
        skipped.append(info)
    if not infos:
        raise CheckpointError(f"{run_dir}: no checkpoint-N directories")
    raise CheckpointError(f"{run_dir}: no complete checkpoint ({'; '.join(f'{i.name}: {i.problems[0]}' for i in skipped)})")
