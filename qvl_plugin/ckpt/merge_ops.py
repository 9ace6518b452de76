"""What a merge plan is made of: per output tensor, its source and the LoRA/DoRA, bias and token-row
operations on it. Pure data; :mod:`merge_plan` builds it, :mod:`merge` streams it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import CheckpointError, UsageError
from . import merge_math as mm
from .reader import TensorReader
from .shards import TensorSpec
from .view import Checkpoint, Entry
from .vocab import VocabResize

__all__ = ["MergeError", "LoraOp", "BiasOp", "TargetOps", "TensorPlan", "MergePlan", "parse_dtype", "delta_bound", "DTYPE_CONFIG_NAMES"]

_DTYPES = {
    "auto": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
    "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}
DTYPE_CONFIG_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


class MergeError(CheckpointError):
    """Adapter entries that cannot be merged onto this base; ``problems`` lists (key, reason)."""

    def __init__(self, message: str, problems: list[tuple[str, str]] = ()):
        super().__init__(message)
        self.problems = list(problems)


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """``auto``/None -> None (keep the base's), else bf16/fp16/fp32."""
    if value is None or isinstance(value, torch.dtype):
        return value
    key = str(value).lower().replace("torch.", "")
    if key not in _DTYPES:
        raise UsageError(f"unknown dtype {value!r} (choose auto, bf16, fp16 or fp32)")
    return _DTYPES[key]


@dataclass
class LoraOp:
    """One LoRA (or DoRA) pair acting on one base weight."""

    kind: mm.Kind
    a: Entry
    b: Entry
    scaling: float
    rank: int
    fan_in_fan_out: bool = False
    magnitude: Entry | None = None
    experts: int = 0          # kind "param": experts of a 3-D parameter (1: a 2-D one)
    transposed: bool = False  # kind "param": the file holds (E, in, out), the transpose of memory
    in_out: bool = False      # kind "param": the module itself stores (E, in, out) (PEFT's is_transposed)

    @property
    def dora(self) -> bool:
        return self.magnitude is not None

    def load(self, reader: "TensorReader") -> dict[str, torch.Tensor]:
        """The factors in fp32, read when the tensor is merged (memory stays flat in the adapter's size)."""
        out = {"a": reader.whole(self.a).float(), "b": reader.whole(self.b).float()}
        if self.magnitude is not None:
            m = reader.whole(self.magnitude).float()
            out["m"] = m if self.kind == "conv" else m.reshape(-1)
        return out


def delta_bound(op: LoraOp, f: dict[str, torch.Tensor]) -> float:
    """An upper bound of ``|ΔW|`` (every element): ``r · max|A| · max|B| · |s|``."""
    return op.rank * float(f["a"].abs().max()) * float(f["b"].abs().max()) * abs(op.scaling)


@dataclass
class BiasOp:
    """``lora_bias``: ``b += lora_B.bias * s``."""

    entry: Entry
    scaling: float


@dataclass
class TensorPlan:
    """What one output tensor is made of."""

    name: str                       # key in the output file (the base's own naming)
    target: str                     # canonical name
    shape: tuple[int, ...]
    dtype: torch.dtype              # output dtype
    source: Entry                   # what the value starts from: a base entry, or the replacement entry
    replaced: bool = False          # source is an adapter tensor (modules_to_save, saved bias / base_layer)
    lora: LoraOp | None = None
    bias_lora: BiasOp | None = None  # lora_B.bias on a bias tensor
    rows: tuple[Entry, tuple[int, ...]] | None = None  # trainable-token rows and their indices
    added: bool = False             # not in the base file (the untied head)

    @property
    def changed(self) -> bool:
        return self.replaced or self.lora is not None or self.bias_lora is not None or self.rows is not None


@dataclass
class MergePlan:
    base: Checkpoint
    adapter: Checkpoint
    tensors: list[TensorPlan]
    config: dict | None
    tied_base: bool
    untie: bool
    notes: list[str] = field(default_factory=list)
    readers: dict[str, TensorReader] = field(default_factory=dict, repr=False)
    vocab: VocabResize | None = None  # a resized vocabulary: embedding/head rows from the adapter

    def __enter__(self) -> "MergePlan":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for r in self.readers.values():
            r.close()
        self.base.close()
        self.adapter.close()

    def specs(self) -> list[TensorSpec]:
        return [TensorSpec(t.name, t.shape, t.dtype) for t in self.tensors]

    def counts(self) -> dict[str, int]:
        c = {"tensors": len(self.tensors), "lora": 0, "dora": 0, "replaced": 0, "token_rows": 0, "bias_lora": 0, "unchanged": 0}
        for t in self.tensors:
            c["lora"] += t.lora is not None and not t.lora.dora
            c["dora"] += t.lora is not None and t.lora.dora
            c["replaced"] += t.replaced
            c["token_rows"] += t.rows is not None
            c["bias_lora"] += t.bias_lora is not None
            c["unchanged"] += not t.changed
        return c


@dataclass
class TargetOps:
    """Everything the adapter does to one canonical base tensor (collected before planning)."""

    replace: Entry | None = None
    lora: LoraOp | None = None
    bias_lora: BiasOp | None = None
    rows: tuple[Entry, tuple[int, ...]] | None = None

    @property
    def empty(self) -> bool:
        return self.replace is None and self.lora is None and self.bias_lora is None and self.rows is None
