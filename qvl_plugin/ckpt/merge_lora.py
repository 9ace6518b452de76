"""Planning one module's LoRA merge: the factors' shapes checked against the base tensor, the kind of
merge decided (embedding, linear, Conv1D fan_in_fan_out, conv, DoRA, lora_bias, target_parameters).

Apart from ``merge_plan`` (which walks every tensor) because this is where the PEFT variants differ.
"""

from __future__ import annotations

import math

from ..errors import AdapterConfigError
from . import merge_math as mm
from .merge_ops import BiasOp, LoraOp, TargetOps
from .merge_params import plan_param_lora
from .view import Role

__all__ = ["plan_lora"]


def plan_lora(module, roles, settings, shape_of, ops, problems, value, fmt, layout, base_entry) -> None:
    """One module's LoRA tensors -> a ``LoraOp`` (and ``BiasOp``) in ``ops``, or its problems; nothing read
    but headers. Shapes decide the kind (embedding, linear with or without fan_in_fan_out, conv)."""
    a = roles.get(Role.LORA_A) or roles.get(Role.EMB_A)
    b = roles.get(Role.LORA_B) or roles.get(Role.EMB_B)
    mag, bias_b = roles.get(Role.MAGNITUDE), roles.get(Role.LORA_BIAS)
    first = next(iter(roles.values()))
    if a is None or b is None:
        problems.append((first.key, f"module {module!r} has {'lora_A' if a is None else 'lora_B'} missing"))
        return
    if (a.role is Role.EMB_A) != (b.role is Role.EMB_B):
        problems.append((a.key, "mixes embedding and linear LoRA factors"))
        return
    if 0 in a.shape or 0 in b.shape or len(a.shape) < 2 or len(b.shape) < 2:
        return  # already reported
    target = a.target
    w_shape = shape_of(target)
    if w_shape is None:
        return  # already reported
    rank = a.shape[0]
    if b.shape[1] != rank and not a.param_wrapper:
        problems.append((b.key, f"rank {b.shape[1]} but lora_A has rank {rank}"))
        return
    if settings is None or settings.alpha_for(a.source_module) is None:
        alpha_hint = (
            "a .pth dump carries no lora_alpha: pass --adapter-config (the run's adapter_config.json) or --lora-alpha; "
            "it is never guessed"
        )
        if fmt == "peft" and settings is not None:
            settings.lora_alpha = 8.0  # PEFT's own default when the config omits it
        else:
            raise AdapterConfigError(alpha_hint)
    if a.param_wrapper or b.param_wrapper:
        op = plan_param_lora(a, b, base_entry(target), settings, layout)
        if isinstance(op, str):
            problems.append((a.key, op))
        else:
            ops.setdefault(target, TargetOps()).lora = op
        return
    scaling = settings.scaling(a.source_module, rank)
    fifo = False
    if a.role is Role.EMB_A:
        kind: mm.Kind = "embedding"
        if len(w_shape) != 2 or a.shape != (rank, w_shape[0]) or b.shape != (w_shape[1], rank):
            problems.append((a.key, f"embedding LoRA A {list(a.shape)} / B {list(b.shape)} does not fit the base {list(w_shape)}"))
            return
        out_features = w_shape[1]
    elif len(a.shape) == 2:
        kind = "linear"
        f = mm.fan_in_fan_out_from_shape(w_shape, a.shape, b.shape, hint=bool(settings.fan_in_fan_out))
        if f is None:
            problems.append((a.key, f"LoRA A {list(a.shape)} / B {list(b.shape)} does not fit the base {list(w_shape)}"))
            return
        fifo, out_features = f, b.shape[0]
    else:
        kind = "conv"
        if len(w_shape) != len(a.shape) or w_shape[0] != b.shape[0] or tuple(a.shape[2:]) != tuple(w_shape[2:]) or any(s != 1 for s in b.shape[2:]) or len(b.shape) != len(w_shape):
            problems.append((a.key, f"conv LoRA A {list(a.shape)} / B {list(b.shape)} does not fit the base {list(w_shape)}"))
            return
        if a.shape[1] != w_shape[1]:
            problems.append((a.key, f"conv LoRA A {list(a.shape)} on a grouped conv {list(w_shape)} (groups > 1 cannot be merged)"))
            return
        out_features = w_shape[0]
    if mag is not None and math.prod(mag.shape) != out_features:
        problems.append((mag.key, f"DoRA magnitude {list(mag.shape)} does not fit {out_features} output features"))
        return
    op = LoraOp(kind, a, b, scaling, rank, fifo, mag)
    o = ops.setdefault(target, TargetOps())
    o.lora = op
    if bias_b is not None:
        bias_target = f"{module}.bias"
        bw = shape_of(bias_target)
        if mag is not None:
            problems.append((bias_b.key, "lora_bias together with DoRA cannot be merged (PEFT refuses it too)"))
        elif bw is None:
            problems.append((bias_b.key, f"lora_B.bias but the base has no {bias_target!r}"))
        elif tuple(bias_b.shape) != tuple(bw):
            problems.append((bias_b.key, f"shape {list(bias_b.shape)} but the base bias has {list(bw)}"))
        else:
            ops.setdefault(bias_target, TargetOps()).bias_lora = BiasOp(bias_b, scaling)
