"""What is in a checkpoint: a pure summary of the view (headers only), for ``qvl-ckpt inspect``."""

from __future__ import annotations

from collections import Counter
from typing import Any

from ..layouts import GROUPS
from .param_targets import wrapper_rank
from .view import Checkpoint, Role

__all__ = ["summarize", "lora_summary"]


def _config_experts(ckpt: Checkpoint) -> int | None:
    cfg = ckpt.config or {}
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    n = text.get("num_experts") if isinstance(text, dict) else None
    return n if isinstance(n, int) and n > 0 else None


def target_names(ckpt: Checkpoint, targeted: list[str]) -> list[str]:
    """The targeted modules as the shortest suffixes that name only them: the leaf (``q_proj``), or
    ``parent.leaf`` where the leaf also names an untargeted module (v1's ``attn.c_proj`` vs ``mlp.c_proj``)."""
    chosen = set(targeted)
    others = {e.module.rsplit(".", 1)[-1] for e in ckpt.entries if e.module not in chosen}
    shared = set(ckpt.layout.shared_leaves) | others
    return sorted({".".join(m.split(".")[-2:]) if m.rsplit(".", 1)[-1] in shared else m.rsplit(".", 1)[-1] for m in targeted})


def lora_summary(ckpt: Checkpoint) -> dict[str, Any] | None:
    """Rank(s), alpha, scaling and targets of the LoRA part; None when there is none."""
    ranks: dict[str, int] = {}
    source: dict[str, str] = {}
    has_dora = False
    params: dict[str, str] = {}  # target_parameters LoRA: canonical target -> "module.param" as PEFT names it
    experts: set[int] = set()
    for e in ckpt.entries:
        if e.role in (Role.LORA_A, Role.EMB_A) and e.numel and e.param_wrapper:
            # lora_A holds r·E rows (one r-block per expert): the rank is r, not the row count
            key = f"{e.source_module}.{e.param}"
            re_ = wrapper_rank(ckpt.adapter, key, e.shape[0], _config_experts(ckpt))
            ranks[e.target] = re_[0] if re_ else e.shape[0]
            source[e.target], params[e.target] = key, e.param
            if re_ and re_[1] > 1:
                experts.add(re_[1])
        elif e.role in (Role.LORA_A, Role.EMB_A) and e.numel:  # empty (ZeRO-3) tensors carry no rank
            ranks[e.module] = e.shape[0]
            source[e.module] = e.source_module
        has_dora |= e.role is Role.MAGNITUDE
    if not ranks:
        return None
    a = ckpt.adapter
    distinct = set(ranks.values())
    rank: int | dict[str, int] = distinct.pop() if len(distinct) == 1 else dict(sorted(ranks.items()))
    alpha = a.lora_alpha if a else None
    scaling: float | dict[str, float] | None = None
    if alpha is not None:
        per = {m: round(a.scaling(source[m], r), 6) for m, r in ranks.items()}
        values = set(per.values())
        scaling = values.pop() if len(values) == 1 else dict(sorted(per.items()))
    return {
        "rank": rank,
        "alpha": alpha,
        "scaling": scaling,
        "target_modules": target_names(ckpt, [m for m in ranks if m not in params]),
        "target_parameters": sorted({".".join(t.split(".")[-3:]) for t in params}),
        "num_experts": (experts.pop() if len(experts) == 1 else sorted(experts)) if experts else None,
        "num_targeted": len(ranks),
        "use_dora": has_dora or bool(a and a.use_dora),
        "use_rslora": bool(a and a.use_rslora),
        "alpha_pattern": dict(a.alpha_pattern) if a and a.alpha_pattern else {},
        "rank_pattern": dict(a.rank_pattern) if a and a.rank_pattern else {},
    }


def _kind(ckpt: Checkpoint, e) -> str:
    """An adapter tensor's role (lora_A, full, ...); a full model's tensors are all plain, so its parameter kind."""
    if ckpt.is_adapter:
        return e.role.value
    return e.param if e.param in ("weight", "bias") else "other"


def summarize(ckpt: Checkpoint) -> dict[str, Any]:
    """The ``inspect --json`` object. Never reads tensor data."""
    layout = ckpt.layout
    groups: dict[str, dict[str, Any]] = {g: {"tensors": 0, "bytes": 0, "modules": set(), "roles": Counter(), "layers": set()} for g in GROUPS}
    for e in ckpt.entries:
        g = groups[layout.group(e.module)]
        g["tensors"] += 1
        g["bytes"] += e.nbytes
        g["modules"].add(e.module)
        g["roles"][_kind(ckpt, e)] += 1
        idx = layout.layer_index(e.module)
        if idx is not None:
            g["layers"].add(idx)
    group_out = {
        name: {
            "tensors": g["tensors"],
            "bytes": g["bytes"],
            "modules": len(g["modules"]),
            "roles": dict(sorted(g["roles"].items())),
            "layers": sorted(g["layers"]),
        }
        for name, g in groups.items()
        if g["tensors"]
    }
    mts = sorted({e.module for e in ckpt.entries if e.role is Role.FULL})
    token_rows: dict[str, list[int] | None] | None = None
    for e in ckpt.entries:
        if e.role is Role.TOKEN_ROWS:
            ids = ckpt.adapter.token_indices(e.source_module) if ckpt.adapter else None
            token_rows = token_rows or {}
            token_rows[e.module] = ids
    a = ckpt.adapter
    base_model = (a.base_model_name_or_path if a else None) or (ckpt.config or {}).get("_name_or_path") or None
    return {
        "path": str(ckpt.path),
        "format": ckpt.format,
        "layout": ckpt.layout.name,
        "num_tensors": len(ckpt.entries),
        "total_bytes": ckpt.total_bytes,
        "dtypes": dict(sorted(Counter(e.dtype_name for e in ckpt.entries).items())),
        "roles": dict(sorted(Counter(_kind(ckpt, e) for e in ckpt.entries).items())),
        "lora": lora_summary(ckpt) if ckpt.is_adapter else None,
        "modules_to_save": mts if ckpt.is_adapter else [],
        "trainable_token_indices": token_rows,
        "bias": [e.module for e in ckpt.entries if e.role is Role.BIAS] if ckpt.is_adapter else [],
        "base_model": base_model,
        "tie_word_embeddings": ckpt.tie_word_embeddings,
        "groups": group_out,
        "files": [p.name for p in ckpt.files],
        "findings": [f.to_dict() for f in ckpt.findings],
    }
