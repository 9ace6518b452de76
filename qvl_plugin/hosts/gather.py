"""Gathering a possibly sharded model's trainable tensors to full size, and the checks before any write.

Under DeepSpeed ZeRO-3 a parameter's local ``.data`` is an empty placeholder, under FSDP1 it is a slice of
a flat shard (possibly 0 elements on some rank), under FSDP2 a DTensor shard. Saving those directly is
how empty ``modules_to_save`` tensors end up on disk (peft#2450, LLaMA-Factory#1226): gather first, check,
and let every rank agree on a refusal so none waits in a collective.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import CheckpointError

__all__ = ["EmptyTensorError", "unwrap_model", "trainable_names", "gather_trainable_state_dict", "check_tensors", "dist_rank", "aliases"]

_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
_WRAPPER_CLASSES = ("DistributedDataParallel", "DataParallel", "DeepSpeedEngine", "FullyShardedDataParallel")


class EmptyTensorError(CheckpointError):
    """A gathered tensor has zero elements (or not its full shape): writing it would produce a broken file."""


# -- distributed helpers -------------------------------------------------------------------------------


def dist_rank() -> tuple[bool, int]:
    """(distributed, rank): (False, 0) outside a process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return True, torch.distributed.get_rank()
    return False, 0


def _agree(error: str | None) -> None:
    """Raise the same error on every rank (rank 0 decides), so no rank waits forever in a collective."""
    distributed, rank = dist_rank()
    if distributed:
        box = [error if rank == 0 else None]
        torch.distributed.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise EmptyTensorError(error)


# -- names ---------------------------------------------------------------------------------------------


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / DataParallel / DeepSpeedEngine / FSDP1 root / torch.compile wrappers."""
    while True:
        if type(model).__name__ in _WRAPPER_CLASSES and isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _clean(name: str) -> str:
    for seg in _WRAPPER_SEGMENTS:
        name = name.replace(seg, "")
    return name


def trainable_names(model: nn.Module) -> list[str]:
    """Names (wrapper segments removed) of parameters with ``requires_grad``, one per tensor."""
    return [_clean(n) for n, p in unwrap_model(model).named_parameters() if p.requires_grad]


def aliases(model: nn.Module) -> dict[str, list[str]]:
    """Trainable name -> other names of the same Parameter (tied modules_to_save copies)."""
    first: dict[int, str] = {}
    out: dict[str, list[str]] = {}
    for n, p in unwrap_model(model).named_parameters(remove_duplicate=False):
        if not p.requires_grad:
            continue
        n = _clean(n)
        if id(p) in first:
            out.setdefault(first[id(p)], []).append(n)
        else:
            first[id(p)] = n
    return out


# -- gathering -----------------------------------------------------------------------------------------


def _full_shape(p: torch.Tensor) -> tuple[int, ...] | None:
    if hasattr(p, "ds_shape"):  # ZeRO-3 partitioned parameter
        return tuple(p.ds_shape)
    if type(p).__name__ == "FlatParameter" or getattr(p, "_is_flat_param", False):
        return None
    return tuple(p.shape)  # DTensor reports the global shape; FSDP1 views are checked against the gather


def _is_fsdp1(model: nn.Module) -> bool:
    """FSDP1 wraps modules; with use_orig_params its parameters are flat 1-D views of the local shard."""
    return any(type(m).__name__ == "FullyShardedDataParallel" for m in model.modules())


def gather_trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full-size CPU copies of every trainable tensor, keyed by its clean PEFT in-memory name.

    A collective under DeepSpeed ZeRO-3 / FSDP: call on every rank. Rank 0 gets the tensors, the other
    ranks an empty dict. Zero-element or wrong-shape results raise :class:`EmptyTensorError` on all ranks.
    """
    distributed, rank = dist_rank()
    if not _is_fsdp1(model):  # FSDP1 needs its root wrapper for the full state dict; others are unwrapped
        model = unwrap_model(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    expected = {_clean(n): _full_shape(p) for n, p in named}
    out: dict[str, torch.Tensor] = {}
    if any(hasattr(p, "ds_id") for _, p in named):  # DeepSpeed ZeRO-3
        import deepspeed  # present whenever ZeRO-3 parameters exist

        for n, p in named:  # one tensor at a time: never the whole model in memory
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if rank == 0:
                    out[_clean(n)] = p.detach().to("cpu", copy=True).contiguous()
    elif _is_fsdp1(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # FSDP1 keeps flat shards (a rank may hold 0 elements of a tensor): only a full state dict is safe.
        # cpu_offload only when the shards are not already on the CPU (offloading CPU tensors crashes).
        on_cpu = all(p.device.type == "cpu" for _, p in named)
        expected = dict.fromkeys(expected)  # local views are flat shards: the full shapes come from the gather
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=not on_cpu))
        if rank == 0:
            full = {_clean(k): v for k, v in full.items()}
            out = {k: full[k].detach().to("cpu", copy=True).contiguous() for k in expected if k in full}
        del full
    else:
        for n, p in named:
            t = p.detach()
            if hasattr(t, "full_tensor"):  # DTensor (FSDP2 / tensor parallel): a collective
                t = t.full_tensor()
            if rank == 0:
                out[_clean(n)] = t.to("cpu", copy=True).contiguous()
    error = check_tensors(out, expected) if rank == 0 else None
    _agree(error)
    return out if rank == 0 else {}


def check_tensors(state_dict: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...] | None] | None = None) -> str | None:
    """The reason ``state_dict`` must not be written, or None: zero-element tensors, missing names, shapes
    that differ from the full parameter shape."""
    problems = []
    empty = [k for k, v in state_dict.items() if v.numel() == 0]
    if empty:
        problems.append(f"{len(empty)} zero-element tensor(s): {', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''}")
    if expected is not None:
        missing = [k for k in expected if k not in state_dict]
        if missing:
            problems.append(f"{len(missing)} trainable tensor(s) not gathered: {', '.join(missing[:5])}")
        wrong = [f"{k} {tuple(state_dict[k].shape)} != {s}" for k, s in expected.items()
                 if s is not None and k in state_dict and k not in empty and tuple(state_dict[k].shape) != tuple(s)]
        if wrong:
            problems.append(f"shape differs from the full parameter: {', '.join(wrong[:5])}")
    if not state_dict and expected is not None and not expected:
        problems.append("the model has no trainable tensors")
    if problems:
        return "refusing to save: " + "; ".join(problems) + " (gather the parameters before saving)"
    return None
