"""PEFT ``target_parameters`` (``lora.ParamWrapper``): which raw parameter a LoRA key belongs to.

PEFT wraps one ``nn.Parameter`` per wrapper and nests the wrappers when a module has several targeted
parameters (fused MoE experts: ``gate_up_proj`` and ``down_proj``). The wrappers are created in the
module's parameter registration order, so the first targeted parameter is the innermost one::

    ...mlp.experts.base_layer.lora_A.weight   -> mlp.experts.gate_up_proj   (depth 1, innermost)
    ...mlp.experts.lora_A.weight              -> mlp.experts.down_proj      (depth 0, outermost)

The factors of a 3-D parameter ``(E, out, in)`` are ``lora_A (r·E, in)`` and ``lora_B (out, r·E)``; a 2-D
parameter (the router ``mlp.gate.weight``) is an ordinary ``(r, in)``/``(out, r)`` pair. Which parameters a
module holds, in which order, is layout data (``parameter_modules``); the adapter config says which of
them were targeted. Without a config (a bare dump) the number of nesting levels must equal the module's
parameter count, or the keys are ambiguous.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..layouts import Layout
from .adapter_config import AdapterSettings
from .keys import ParsedKey, Role

__all__ = ["WrappedKey", "resolve_wrapped", "targeted_parameters", "wrapper_rank"]

_WRAPPABLE = frozenset({Role.LORA_A, Role.LORA_B})
_BASE_LAYER = ".base_layer"


@dataclass(frozen=True)
class WrappedKey:
    module: str   # the module holding the parameter (source naming, no ``.base_layer``)
    param: str    # the wrapped parameter's name
    depth: int    # how many ``.base_layer`` levels lie above it (0 = outermost wrapper)


def _strip(module: str) -> tuple[str, int]:
    depth = 0
    while module.endswith(_BASE_LAYER):
        module, depth = module[: -len(_BASE_LAYER)], depth + 1
    return module, depth


def targeted_parameters(settings: AdapterSettings | None) -> list[str] | None:
    tp = settings.raw.get("target_parameters") if settings is not None else None
    return list(tp) if isinstance(tp, list) and all(isinstance(t, str) for t in tp) and tp else None


def _matches(key: str, targets: list[str]) -> bool:
    return key in targets or any(key.endswith("." + t) for t in targets)  # PEFT's own rule (_inject_parameters)


def resolve_wrapped(
    parsed: list[ParsedKey], settings: AdapterSettings | None, layout: Layout
) -> tuple[dict[int, WrappedKey], list[str]]:
    """Index into ``parsed`` -> the wrapped parameter, for every LoRA key of a ParamWrapper; plus problems
    (keys that cannot be assigned). Keys of ordinary LoRA layers are left out."""
    targets = targeted_parameters(settings)
    holders: dict[str, list[tuple[int, int]]] = {}
    for i, p in enumerate(parsed):
        if p is None or p.role not in _WRAPPABLE:
            continue
        holder, depth = _strip(p.module)
        known = layout.module_parameters(layout.canonical(holder))
        if targets is None:
            if known is None:
                continue
        elif not any(_matches(f"{holder}.{n}", targets) for n in (known or (p.param,))):
            continue
        holders.setdefault(holder, []).append((i, depth))

    out: dict[int, WrappedKey] = {}
    problems: list[str] = []
    for holder, items in holders.items():
        known = layout.module_parameters(layout.canonical(holder))
        levels = max(d for _, d in items) + 1
        if targets is not None:
            order = list(known) if known else sorted({t.rpartition(".")[2] for t in targets})
            params = [n for n in order if _matches(f"{holder}.{n}", targets)]
            if not known and len(params) > 1:
                problems.append(f"{holder}: several targeted parameters {params} on a module whose parameter order is unknown")
                continue
        else:
            params = list(known or ())
        if not params:
            continue
        if len(params) < levels or (targets is None and len(params) != levels):
            problems.append(
                f"{holder}: {levels} nested LoRA wrapper(s) for the parameters {params}: which parameter each one "
                "adapts is ambiguous without the run's adapter_config.json (target_parameters): pass --adapter-config"
            )
            continue
        n = len(params)
        for i, depth in items:
            if depth >= n:
                problems.append(f"{holder}: LoRA nested {depth} levels deep but only {n} parameters are targeted")
                continue
            out[i] = WrappedKey(holder, params[n - 1 - depth], depth)
    return out, problems


def wrapper_rank(settings: AdapterSettings | None, key: str, rows: int, num_experts: int | None = None) -> tuple[int, int] | None:
    """(rank, experts) of a ParamWrapper's ``lora_A`` with ``rows = r·E`` rows: from the base's expert count
    when known, else from the adapter config's ``r``/``rank_pattern`` (PEFT's lookup on ``module.param``)."""
    if num_experts:
        return (rows // num_experts, num_experts) if rows % num_experts == 0 else None
    if settings is None:
        return None
    r = settings.r
    if settings.rank_pattern:
        from .adapter_config import _pattern_key

        k = _pattern_key(settings.rank_pattern, key)
        if k is not None:
            r = int(settings.rank_pattern[k])
    if not r or rows % r:
        return None
    return r, rows // r


def param_shape_problem(a_shape: tuple[int, ...], b_shape: tuple[int, ...], want: tuple[int, ...]) -> str | None:
    """Why a ParamWrapper pair cannot act on a base tensor of shape ``want`` (2-D, or 3-D experts in either
    the memory or the hub orientation), or None."""
    if len(a_shape) != 2 or len(b_shape) != 2 or b_shape[1] != a_shape[0]:
        return f"LoRA A {list(a_shape)} / B {list(b_shape)} are not a ParamWrapper pair"
    out_f, in_f = b_shape[0], a_shape[1]
    if len(want) == 2:
        return None if tuple(want) == (out_f, in_f) else f"LoRA delta {[out_f, in_f]} for a base tensor {list(want)}"
    if len(want) == 3:
        if a_shape[0] % want[0]:
            return f"lora_A has {a_shape[0]} rows, not a multiple of the base's {want[0]} experts"
        if tuple(want[1:]) in ((out_f, in_f), (in_f, out_f)):
            return None
        return f"expert LoRA delta {[want[0], out_f, in_f]} for a base tensor {list(want)}"
    return f"target_parameters LoRA on a {len(want)}-D tensor {list(want)}"
