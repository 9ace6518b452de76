"""Header-only safetensors access with one lazily opened mmap handle per file."""

from __future__ import annotations

from pathlib import Path

from typing import TYPE_CHECKING

from ...errors import CheckpointError
from ..dtypes import SAFETENSORS_NAMES
from ..safety import read_safetensors_header
from . import RawTensor

if TYPE_CHECKING:
    import torch

__all__ = ["SafetensorsFile"]


class SafetensorsFile:
    """A validated header now, tensor bytes only when ``load`` is called."""

    def __init__(self, path: Path):
        self.path = path
        self.header, self.metadata = read_safetensors_header(path)
        with open(path, "rb") as f:  # validated above: the data section starts right after the header
            self.data_start = 8 + int.from_bytes(f.read(8), "little")
        self._handle = None

    def _open(self):
        if self._handle is None:
            try:
                from safetensors import safe_open  # imports torch: only when a value is read

                self._handle = safe_open(str(self.path), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error type
                raise CheckpointError(f"{self.path.name}: cannot open safetensors ({e})") from None
        return self._handle

    def get(self, key: str) -> "torch.Tensor":
        try:
            return self._open().get_tensor(key)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{self.path.name}: cannot read tensor {key!r} ({e})") from None

    def tensors(self) -> list[RawTensor]:
        return [
            RawTensor(
                key,
                tuple(int(s) for s in info["shape"]),
                SAFETENSORS_NAMES[info["dtype"]],
                lambda k=key: self.get(k),
                location=(self.path, self.data_start + info["data_offsets"][0]),
            )
            for key, info in self.header.items()
        ]

    def close(self) -> None:
        self._handle = None
