"""Planning and streaming a ``target_parameters`` LoRA (PEFT ``lora.ParamWrapper``) on one base tensor.

Fused MoE experts ``(E, out, in)`` in memory; a hub file may hold ``(E, in, out)`` (transformers transposes
such tensors on load when the file's shape differs from the model's: ``Transpose(1, 2, check_dims=True)``
in its conversion mapping, mirrored by the layout's ``transposed_on_disk``). The delta is computed in
PEFT's orientation and transposed to the file's, so the output keeps the base file's own layout.

Streaming: one slice of experts at a time (about :data:`reader.CHUNK_ELEMENTS` elements, at least one
expert), so peak memory is a few times the largest expert, never the whole stack.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch

from ..layouts import Layout
from . import merge_math as mm
from .adapter_config import AdapterSettings
from .devices import to_cpu
from .merge_ops import LoraOp, TensorPlan
from .reader import CHUNK_ELEMENTS, TensorReader
from .view import Entry

__all__ = ["plan_param_lora", "stream_param"]


def plan_param_lora(a: Entry, b: Entry, w: Entry, settings: AdapterSettings, layout: Layout) -> LoraOp | str:
    """The op for a ParamWrapper pair on base tensor ``w``, or why it does not fit."""
    out_f, in_f, rows = b.shape[0], a.shape[1], a.shape[0]
    if b.shape[1] != rows:
        return f"lora_B {list(b.shape)} does not match lora_A {list(a.shape)} (r·E columns)"
    key = f"{a.source_module}.{a.param}"  # PEFT looks rank/alpha patterns up on module.param
    if len(w.shape) == 2:
        if tuple(w.shape) != (out_f, in_f):
            return f"LoRA A {list(a.shape)} / B {list(b.shape)} does not fit the base {list(w.shape)}"
        return LoraOp("param", a, b, settings.scaling(key, rows), rows, experts=1)
    if len(w.shape) != 3:
        return f"target_parameters LoRA on a {len(w.shape)}-D tensor {list(w.shape)} (PEFT supports 2-D and 3-D)"
    experts = w.shape[0]
    if rows % experts:
        return f"lora_A has {rows} rows, not a multiple of the base's {experts} experts"
    rank = rows // experts
    inner = tuple(w.shape[1:])
    transposed = in_out = False
    if inner == (out_f, in_f):
        pass
    elif inner == (in_f, out_f):
        if layout.disk_transposable(w.target):
            transposed = True  # a hub file: (E, in, out) on disk, (E, out, in) in memory
        else:
            in_out = True  # a module PEFT sees as is_transposed: (E, in, out) in memory too
    else:
        return f"expert LoRA A {list(a.shape)} / B {list(b.shape)} does not fit the base {list(w.shape)}"
    return LoraOp("param", a, b, settings.scaling(key, rank), rank, experts=experts, transposed=transposed, in_out=in_out)


def _experts_per_chunk(shape: tuple[int, ...]) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, math.prod(shape[1:])))


def stream_param(tp: TensorPlan, reader: TensorReader, factors: dict[str, torch.Tensor], chunk_experts: int | None = None) -> Iterator[torch.Tensor]:
    """The merged tensor in slices of experts (dim 0), bit-identical to PEFT's whole-tensor merge."""
    op = tp.lora
    if op.experts == 1:
        w = reader.whole(tp.source)
        yield mm.merge_param(w, to_cpu(mm.param_delta(factors["a"], factors["b"], op.scaling, 1)), tp.dtype)
        return
    step = chunk_experts or _experts_per_chunk(tp.shape)
    buf = torch.empty(step * math.prod(tp.shape[1:]) * tp.source.dtype.itemsize, dtype=torch.uint8)  # reused reads
    for start in range(0, op.experts, step):
        stop = min(op.experts, start + step)
        w = reader.rows(tp.source, start, stop, buf)
        delta = to_cpu(mm.param_delta(factors["a"], factors["b"], op.scaling, op.experts, start=start, stop=stop, in_out=op.in_out))
        if op.transposed:
            delta = delta.transpose(1, 2)
        yield mm.merge_param(w, delta, tp.dtype).contiguous()
