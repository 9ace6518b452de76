"""Tensor dtypes by name, without importing torch.

Header-only work (inspect, ``ls``, audit's header checks) must not pay for ``import torch``; a dtype is
carried as torch's attribute name (``"bfloat16"``) and turned into a ``torch.dtype`` only where values are
read or written.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SAFETENSORS_NAMES", "itemsize", "is_floating", "torch_dtype", "name_of"]

#: safetensors header dtype -> torch attribute name
SAFETENSORS_NAMES: dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "U16": "uint16", "U32": "uint32", "U64": "uint64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}
_ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2, "int8": 1,
             "uint8": 1, "bool": 1, "uint16": 2, "uint32": 4, "uint64": 8, "float8_e4m3fn": 1, "float8_e5m2": 1}
_FLOATING = {"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"}


def itemsize(name: str) -> int:
    size = _ITEMSIZE.get(name)
    return size if size is not None else torch_dtype(name).itemsize  # rarer dtypes (pickles only): ask torch


def is_floating(name: str) -> bool:
    return name in _FLOATING or (name not in _ITEMSIZE and torch_dtype(name).is_floating_point)


def torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)


def name_of(dtype: Any) -> str:
    """``torch.bfloat16`` (or its name) -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")
