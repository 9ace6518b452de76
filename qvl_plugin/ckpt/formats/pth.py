"""``torch.save`` dicts (manual dumps, non-PEFT .bin) read with weights_only + mmap: no code runs,
no tensor bytes are read until asked."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import CheckpointError
from ..safety import safe_torch_load
from ..dtypes import name_of
from . import RawCheckpoint, RawTensor

if TYPE_CHECKING:
    import torch

__all__ = ["read", "tensors_from_state_dict"]

_WRAPPERS = ("state_dict", "model", "module", "model_state_dict")


def _storage_id(t: "torch.Tensor") -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def tensors_from_state_dict(sd: dict, name: str) -> tuple[list[RawTensor], list[tuple]]:
    import torch  # only after a pickle was loaded, which imported it already

    notes: list[tuple] = []
    if not isinstance(sd, dict):
        raise CheckpointError(f"{name}: expected a dict of tensors, found {type(sd).__name__}")
    if not any(isinstance(v, torch.Tensor) for v in sd.values()):
        for w in _WRAPPERS:
            if isinstance(sd.get(w), dict):
                notes.append(("wrapped-state-dict", "info", f"tensors read from the {w!r} entry", ()))
                sd = sd[w]
                break
    skipped = [str(k) for k, v in sd.items() if not isinstance(v, torch.Tensor) or not isinstance(k, str)]
    if skipped:
        notes.append(("non-tensor-entries", "info", f"{len(skipped)} non-tensor entries ignored", tuple(skipped[:20])))
    for k, v in sd.items():
        if isinstance(k, str) and isinstance(v, torch.Tensor) and (
            v.layout is not torch.strided or v.is_nested or v.is_quantized or v.is_meta
        ):
            kind = "nested" if v.is_nested else "quantized" if v.is_quantized else "meta" if v.is_meta else str(v.layout).replace("torch.", "")
            raise CheckpointError(f"{name}: tensor {k[:80]!r} is a {kind} tensor; only dense tensors with data are supported")
    tensors = [
        RawTensor(k, tuple(v.shape), name_of(v.dtype), lambda v=v: v, _storage_id(v))
        for k, v in sd.items()
        if isinstance(k, str) and isinstance(v, torch.Tensor)
    ]
    if not tensors:
        raise CheckpointError(f"{name}: holds no tensors")
    return tensors, notes


def read(path: Path) -> RawCheckpoint:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    obj = safe_torch_load(path)
    tensors, notes = tensors_from_state_dict(obj, path.name)
    return RawCheckpoint("pth", path, tensors, [path], notes=notes)
