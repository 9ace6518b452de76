"""Where the LoRA/DoRA products and SVDs run: ``--device auto|cpu|cuda``.

Only the arithmetic moves: plans, reads and writes stay on the CPU, and each product's inputs go to the
device and its result comes back, so memory stays bounded the same way. ``auto`` is CUDA when torch sees a
GPU, else the CPU; asking for ``cuda`` without one is a usage error (one line), never a silent fallback.

On CUDA the fp32 products sum in cuBLAS's order, not the CPU BLAS's: not bit-identical to the CPU path
(and so to PEFT on CPU). TF32 is never used (``torch.backends.cuda.matmul.allow_tf32`` is left at torch's
default, off), so the fp32 deltas agree to fp32 rounding and the merged values to one unit in the last place
of the output dtype, in the few elements whose sum lies on a rounding boundary.
"""

from __future__ import annotations

import torch

from ..errors import UsageError

__all__ = ["DEVICES", "resolve_device", "cuda_available", "to_device", "to_cpu"]

DEVICES = ("auto", "cpu", "cuda")


def cuda_available() -> bool:
    """A seam for tests (no GPU here): does torch see a usable CUDA device?"""
    return torch.cuda.is_available()


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``auto``/None -> cuda if available else cpu; ``cpu``; ``cuda`` (or ``cuda:N``) only when there is one."""
    if isinstance(name, torch.device):
        name = str(name)
    key = (name or "auto").strip().lower()
    if key == "auto":
        return torch.device("cuda") if cuda_available() else torch.device("cpu")
    if key == "cpu":
        return torch.device("cpu")
    if key == "cuda" or key.startswith("cuda:"):
        if not cuda_available():
            raise UsageError(f"--device {key}: torch sees no CUDA GPU here (torch {torch.__version__}); use --device cpu or auto")
        dev = torch.device(key)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {key}: only {torch.cuda.device_count()} CUDA device(s)")
        return dev
    raise UsageError(f"unknown device {name!r} (choose auto, cpu or cuda)")


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device`` (the same tensor on the CPU path: no copy)."""
    if t.device == device:
        return t
    return t.to(device, non_blocking=False)


def to_cpu(t: torch.Tensor) -> torch.Tensor:
    return t if t.device.type == "cpu" else t.cpu()
