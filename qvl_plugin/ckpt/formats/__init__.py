"""One module per on-disk format. Each turns a path into raw tensors (key, shape, dtype, loader)
plus whatever config travels with it; naming and roles are the view's job, not theirs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

from ...errors import CheckpointError
from ..dtypes import torch_dtype

if TYPE_CHECKING:
    import torch

__all__ = ["RawTensor", "RawCheckpoint", "FORMATS", "detect_format", "read_raw"]

Format = Literal["pth", "peft", "merged"]
FORMATS: tuple[str, ...] = ("pth", "peft", "merged")


@dataclass(frozen=True)
class RawTensor:
    key: str
    shape: tuple[int, ...]
    dtype_name: str  # torch's name ("bfloat16"); torch itself is imported only when a tensor is read
    load: Callable[[], "torch.Tensor"] = field(repr=False, compare=False)
    storage: Any = field(default=None, repr=False, compare=False)  # identity for duplicate detection (pth)
    location: tuple[Path, int] | None = field(default=None, repr=False, compare=False)  # safetensors: file, data offset

    @property
    def dtype(self) -> "torch.dtype":
        return torch_dtype(self.dtype_name)


@dataclass
class RawCheckpoint:
    format: str
    path: Path
    tensors: list[RawTensor]
    files: list[Path]
    config: dict | None = None          # config.json of a merged model
    adapter_config: dict | None = None  # adapter_config.json of a PEFT adapter
    notes: list[tuple[str, str, str, tuple[str, ...]]] = field(default_factory=list)  # (code, severity, message, keys)
    close: Callable[[], None] = lambda: None


def detect_format(path: Path) -> str:
    """Guess the format from what is on disk; ``--format`` overrides."""
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            return "peft"
        if (path / "config.json").is_file() or any(path.glob("*.safetensors")) or (path / "pytorch_model.bin").is_file():
            return "merged"
        raise CheckpointError(f"{path}: directory has neither adapter_config.json nor config.json/weights")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return "merged"
    if suffix in (".pth", ".pt", ".bin", ".ckpt"):
        if path.name == "adapter_model.bin" and (path.parent / "adapter_config.json").is_file():
            return "peft"
        if path.name.startswith("pytorch_model"):
            return "merged"
        return "pth"
    raise CheckpointError(f"{path.name}: unknown checkpoint type (expected .pth/.pt/.bin, .safetensors, or a directory)")


def read_raw(path: Path, fmt: str) -> RawCheckpoint:
    from . import merged, peft, pth

    readers = {"pth": pth.read, "peft": peft.read, "merged": merged.read}
    if fmt not in readers:
        raise CheckpointError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    return readers[fmt](path)
