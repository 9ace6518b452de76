"""Rebuild the trained tensors of a DeepSpeed run from its own shards (``global_stepN/``).

When a ZeRO-3 run saved its adapter without gathering (every tensor of shape ``(0,)``), the weights still
exist: each rank's ``*_optim_states.pt`` holds its slice of the fp32 master weights, and a
``*_model_states.pt`` holds the parameter names and full shapes. Putting the slices back together is what
DeepSpeed's own ``zero_to_fp32`` does; this module does the same for the trainable tensors (LoRA,
modules_to_save, token rows), without DeepSpeed installed and without running code from the files:

* every file is read with ``torch.load(weights_only=True, mmap=True)``;
* the three DeepSpeed objects these pickles carry (``ZeroStageEnum``, ``LossScaler``, ZeRO-1/2's
  ``fragment_address``) are admitted through an explicit allow-list of inert stand-ins (plain int, attribute bags): no DeepSpeed code is imported or run,
  and any other global in the pickle is refused.

The result is the clean dump (PEFT in-memory names, one key per trainable tensor), written as ``.pth`` or
converted into a PEFT adapter with :func:`qvl_plugin.ckpt.convert.convert` (atomic, through the writer;
the .pth through ``outputs.atomic_file``).
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import AdapterConfigError, CheckpointError, UsageError
from .safety import safe_torch_load
from .outputs import atomic_file, check_output

__all__ = ["RecoverReport", "find_deepspeed_dir", "load_zero_state_dict", "recover", "DEEPSPEED_SAFE_GLOBALS"]

_STEP = re.compile(r"global_step(\d+)$")
_CKPT = re.compile(r"checkpoint-(\d+)$")


class _LossScaler:
    """Stand-in for ``deepspeed.runtime.fp16.loss_scaler.LossScaler``: receives its attributes, runs nothing."""


class _FragmentAddress:
    """Stand-in for ``deepspeed.utils.tensor_fragment.fragment_address`` (ZeRO-1/2 parameter slices)."""


def _zero_stage_enum(value: int) -> int:
    """Stand-in for ``deepspeed.runtime.zero.config.ZeroStageEnum(value)``."""
    if not isinstance(value, int) or value not in (0, 1, 2, 3):
        raise ValueError(f"ZeroStageEnum({value!r})")
    return value


# The only non-tensor classes a DeepSpeed 0.x ZeRO checkpoint needs, each mapped to an inert stand-in.
DEEPSPEED_SAFE_GLOBALS = [
    (_LossScaler, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
    (_zero_stage_enum, "deepspeed.runtime.zero.config.ZeroStageEnum"),
    (_FragmentAddress, "deepspeed.utils.tensor_fragment.fragment_address"),
]


@dataclass
class RecoverReport:
    """What :func:`recover` rebuilt and wrote."""

    source: Path
    deepspeed_dir: Path
    out: Path
    to: str
    zero_stage: int
    world_size: int
    tensors: int
    numel: int
    adapter_config: Path | None = None
    keys: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"source": str(self.source), "deepspeed_dir": str(self.deepspeed_dir), "out": str(self.out), "to": self.to,
                "zero_stage": self.zero_stage, "world_size": self.world_size, "tensors": self.tensors, "numel": self.numel,
                "adapter_config": str(self.adapter_config) if self.adapter_config else None}


# -- locating the shards ---------------------------------------------------------------------------------------


def _newest(paths, pattern: re.Pattern) -> list[Path]:
    found = [(int(m.group(1)), p) for p in paths if p.is_dir() and (m := pattern.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def find_deepspeed_dir(path: str | Path) -> Path:
    """The ``global_stepN`` dir for PATH: that dir itself, a ``checkpoint-N/`` (its ``latest`` tag, else the
    highest step), or a run dir (the newest ``checkpoint-N/`` that has DeepSpeed shards)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (give a run dir, a checkpoint-N dir or a global_stepN dir)")
    if any(path.glob("*_optim_states.pt")):
        return path
    latest = path / "latest"
    if latest.is_file():
        tag = latest.read_text(encoding="utf-8", errors="replace").strip()
        if tag and "/" not in tag and "\\" not in tag and tag not in (".", "..") and (path / tag).is_dir():
            return find_deepspeed_dir(path / tag)
    for step in _newest(path.iterdir(), _STEP):
        if any(step.glob("*_optim_states.pt")):
            return step
    for ckpt in _newest(path.iterdir(), _CKPT):
        try:
            return find_deepspeed_dir(ckpt)
        except CheckpointError:
            continue
    raise CheckpointError(f"{path}: no DeepSpeed shards found (no global_stepN/ with *_optim_states.pt here, "
                          "in a checkpoint-N/ or in its 'latest' tag)")


# -- loading and rebuilding ------------------------------------------------------------------------------------


def _load(path: Path) -> dict:
    with torch.serialization.safe_globals(DEEPSPEED_SAFE_GLOBALS):
        obj = safe_torch_load(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path.name}: expected a dict, got {type(obj).__name__}")
    return obj


def _rank(p: Path) -> int:
    m = re.search(r"zero_pp_rank_(\d+)_", p.name) or re.search(r"rank_(\d+)", p.name)
    return int(m.group(1)) if m else 0


def load_zero_state_dict(ds_dir: str | Path) -> tuple[dict[str, torch.Tensor], int, int]:
    """(trainable tensors in fp32 under their model names, zero stage, world size) from a ``global_stepN`` dir."""
    ds_dir = Path(ds_dir)
    optim_files = sorted(ds_dir.glob("*_optim_states.pt"), key=_rank)
    model_files = sorted(ds_dir.glob("*_model_states.pt"), key=_rank)
    if not optim_files or not model_files:
        raise CheckpointError(f"{ds_dir}: needs *_model_states.pt and *_optim_states.pt files")
    model_state = _load(model_files[0])
    param_shapes = model_state.get("param_shapes")
    if not isinstance(param_shapes, (list, tuple)) or not all(isinstance(g, dict) for g in param_shapes):
        raise CheckpointError(f"{model_files[0].name}: no param_shapes (not a DeepSpeed ZeRO model state)")
    flats: list[list[torch.Tensor]] = []
    stage = world = None
    for f in optim_files:
        osd = _load(f).get("optimizer_state_dict")
        if not isinstance(osd, dict) or "zero_stage" not in osd:
            raise CheckpointError(f"{f.name}: not a DeepSpeed ZeRO optimizer state")
        stage = int(osd["zero_stage"])
        count = osd.get("partition_count")
        world = max(count) if isinstance(count, (list, tuple)) else int(count)
        groups = osd.get("fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups")
        if not isinstance(groups, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in groups):
            raise CheckpointError(f"{f.name}: no fp32 partitions for ZeRO stage {stage}")
        flats.append(list(groups))
        paddings = osd.get("param_alignment_paddings")
    if world != len(optim_files):
        raise CheckpointError(f"{ds_dir}: the run had {world} ranks but {len(optim_files)} *_optim_states.pt files are "
                              "here (a rank's shard is missing or an old one was left behind)")
    shapes = [{name: tuple(int(d) for d in shape) for name, shape in group.items()} for group in param_shapes]
    out = _zero3(shapes, flats, world) if stage == 3 else _zero12(shapes, flats, world, paddings)
    for alias, target in (model_state.get("shared_params") or {}).items():
        if target in out:
            out[alias] = out[target]
    return out, stage, world


def _zero3(shapes: list[dict], flats: list[list[torch.Tensor]], world: int) -> dict[str, torch.Tensor]:
    """Each parameter is split into ``world`` equal slices (the last padded), one per rank, laid out in
    param_shapes order across the concatenated groups of each rank (zero_to_fp32's protocol)."""
    per_rank = [torch.cat([t.reshape(-1) for t in groups]) for groups in flats]
    offset, out = 0, {}
    for group in shapes:
        for name, shape in group.items():
            numel = math.prod(shape)
            part = math.ceil(numel / world)
            if offset + part > per_rank[0].numel():
                raise CheckpointError(f"ZeRO-3 partitions end before {name} (shapes and shards disagree)")
            full = torch.cat([r[offset:offset + part] for r in per_rank])[:numel]
            out[name] = full.view(shape).clone()
            offset += part
    if offset != per_rank[0].numel():
        raise CheckpointError(f"ZeRO-3 partitions hold {per_rank[0].numel()} elements per rank, the shapes use {offset}")
    return out


def _zero12(shapes: list[dict], flats: list[list[torch.Tensor]], world: int, paddings) -> dict[str, torch.Tensor]:
    """Each param group is one flat vector split across the ranks; parameters lie in it one after another."""
    out = {}
    for g, group in enumerate(shapes):
        full = torch.cat([flats[r][g].reshape(-1) for r in range(world)])
        offset = 0
        for i, (name, shape) in enumerate(group.items()):
            numel = math.prod(shape)
            if offset + numel > full.numel():
                raise CheckpointError(f"ZeRO partitions end before {name} (shapes and shards disagree)")
            out[name] = full[offset:offset + numel].view(shape).clone()
            offset += numel
            if paddings is not None:
                offset += int(paddings[g][i])
        align = 2 * world
        if math.ceil(offset / align) * align != math.ceil(full.numel() / align) * align:
            raise CheckpointError(f"ZeRO group {g}: used {offset} of {full.numel()} elements (shapes and shards disagree)")
    return out


# -- writing ---------------------------------------------------------------------------------------------------


def _adapter_config(ds_dir: Path, source: Path, given: str | Path | None) -> Path | None:
    if given is not None:
        return Path(given)
    for d in (ds_dir.parent, source, source / "adapter"):
        if (d / "adapter_config.json").is_file():
            return d / "adapter_config.json"
    return None


def recover(src: str | Path, out: str | Path, *, to: str = "peft", adapter_config: str | Path | None = None,
            lora_alpha: float | None = None, base: str | Path | None = None, force: bool = False) -> RecoverReport:
    """Rebuild the trainable tensors from SRC's DeepSpeed shards and write them to OUT as ``peft`` or ``pth``.

    ``peft`` needs the run's adapter_config.json (found next to ``global_stepN/`` in the Trainer's
    ``checkpoint-N/``, or given) or ``lora_alpha``: alpha is never guessed.
    """
    if to not in ("peft", "pth"):
        raise UsageError(f"--to must be peft or pth, not {to!r}")
    source = Path(src)
    ds_dir = find_deepspeed_dir(source)
    check_output(out, [source], force)
    tensors, stage, world = load_zero_state_dict(ds_dir)
    trainable = {k: v.contiguous() for k, v in tensors.items()}
    if not trainable:
        raise CheckpointError(f"{ds_dir}: the shards hold no trainable tensors")
    cfg = _adapter_config(ds_dir, source, adapter_config)
    report = RecoverReport(source, ds_dir, Path(out), to, stage, world, len(trainable),
                           sum(t.numel() for t in trainable.values()), cfg, list(trainable))
    if to == "pth":
        with atomic_file(out, [source], force) as tmp:
            torch.save(trainable, tmp)
        return report
    if cfg is None and lora_alpha is None:
        raise AdapterConfigError(f"{ds_dir}: no adapter_config.json next to the shards; pass --adapter-config "
                                 "(the run's adapter_config.json) or --lora-alpha (alpha is never guessed)")
    if cfg is not None:
        try:
            json.loads(cfg.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise AdapterConfigError(f"{cfg}: not a readable adapter_config.json ({e})") from None
    from .convert import convert

    with tempfile.TemporaryDirectory(prefix=".qvl-recover-") as scratch:
        dump = Path(scratch) / "recovered.pth"
        torch.save(trainable, dump)
        convert(dump, "peft", out, base=base, adapter_config=cfg if lora_alpha is None else None, lora_alpha=lora_alpha,
                force=force)
    return report
