"""What changed between two checkpoints, in the canonical name space, tensor by tensor.

Any two formats compare: a ``.pth`` dump and the PEFT adapter of the same run see the same rows, and so do
an old-layout and a new-layout adapter. Adapters compare by *effect*: a LoRA pair is the product
``s·B@A``, and ``||ΔW_a - ΔW_b||_F`` comes from r×r Gram products of the factors, never from the
out×in matrix. With a base, an adapter and a merged model compare by their effective weights.

Planning reads headers only; values are loaded one row at a time and released.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UsageError
from .config_diff import config_changes
from .diff_report import DiffReport, GroupDiff, TensorDiff, sort_key
from .effect import LoraPair, effective_weight, expert_effect_stats, lora_effect_stats, lora_pairs, tensor_stats
from .param_targets import wrapper_rank
from .devices import resolve_device
from .formats import detect_format
from .view import Checkpoint, Entry, Role, open_checkpoint

__all__ = ["diff_checkpoints", "DiffReport", "GroupDiff", "TensorDiff"]


@dataclass
class _Item:
    """One comparable thing on one side: a stored tensor, a LoRA effect, a scaled lora bias, token rows."""

    name: str
    kind: str
    module: str
    entries: tuple[Entry, ...]
    pair: LoraPair | None = None
    scaling: float | None = None
    indices: list[int] | None = None
    experts: int | None = None  # target_parameters LoRA on a 3-D parameter: compared expert by expert

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(e.key for e in self.entries)

    @property
    def shape(self) -> tuple[int, ...] | None:
        if self.pair is not None and self.experts:
            return (self.experts, self.pair.b.shape[0], self.pair.a.shape[1])
        if self.pair is not None:
            return self.pair.effect_shape
        return self.entries[0].shape

    @property
    def dtype(self) -> str:
        return "/".join(sorted({e.dtype_name for e in self.entries}))


class _Scaling:
    """LoRA scaling and token indices for one side; a side without them (a ``.pth`` dump) borrows the other
    side's adapter settings (noted)."""

    def __init__(self, own: Checkpoint, other: Checkpoint, label: str, notes: list[str]):
        self.settings = None
        needs = any(e.role in (Role.LORA_A, Role.EMB_A, Role.TOKEN_ROWS) for e in own.entries)
        if own.adapter is not None and own.adapter.lora_alpha is not None:
            self.settings = own.adapter
        elif other.adapter is not None and other.adapter.lora_alpha is not None and needs:
            self.settings = other.adapter
            notes.append(f"{label} has no lora_alpha: used the other side's adapter settings (alpha {other.adapter.lora_alpha:g})")
        elif any(e.role in (Role.LORA_A, Role.EMB_A) for e in own.entries):
            notes.append(f"{label} has no lora_alpha: its LoRA effects are compared unscaled (B@A, scaling 1)")
        self.own = own.adapter

    def __call__(self, source_module: str, rank: int | None) -> float:
        if self.settings is None or rank is None:
            return 1.0
        return self.settings.scaling(source_module, rank)

    def token_indices(self, source_module: str) -> list[int] | None:
        """This side's trainable-token indices, else the borrowed settings' (a dump stores none)."""
        for s in (self.own, self.settings):
            ids = s.token_indices(source_module) if s is not None else None
            if ids is not None:
                return ids
        return None


def _items(ckpt: Checkpoint, scaling: _Scaling) -> dict[tuple[str, str], _Item]:
    """Header-only: the comparable items of one checkpoint, keyed by (canonical name, kind)."""
    items: dict[tuple[str, str], _Item] = {}
    pairs = lora_pairs(ckpt.entries)
    lora_modules = {p.module for p in pairs.values()}
    for target, pair in pairs.items():
        if pair.a is not None and pair.b is not None and pair.a.param_wrapper:
            key = f"{pair.source_module}.{pair.a.param}"
            re_ = wrapper_rank(scaling.settings or ckpt.adapter, key, pair.a.shape[0])
            rank, experts = re_ if re_ else (None, None)
            items[(target, "lora")] = _Item(target, "lora", pair.module, (pair.a, pair.b), pair, scaling(key, rank), experts=experts)
        elif pair.a is not None and pair.b is not None:
            items[(target, "lora")] = _Item(target, "lora", pair.module, (pair.a, pair.b), pair, scaling(pair.source_module, pair.rank))
        else:
            e = pair.a or pair.b
            items[(target, e.role.value)] = _Item(target, e.role.value, e.module, (e,))
    for e in ckpt.entries:
        if e.role in (Role.LORA_A, Role.LORA_B, Role.EMB_A, Role.EMB_B):
            continue
        if e.role is Role.LORA_BIAS:
            pair = pairs.get(f"{e.module}.weight")
            items[(e.target, "lora_bias")] = _Item(e.target, "lora_bias", e.module, (e,), None, scaling(e.source_module, pair.rank if pair else None))
        elif e.role is Role.MAGNITUDE:
            items[(e.target, "magnitude")] = _Item(e.target, "magnitude", e.module, (e,))
        elif e.role is Role.TOKEN_ROWS:
            items[(e.target, "token_rows")] = _Item(e.target, "token_rows", e.module, (e,), indices=scaling.token_indices(e.source_module))
        elif ckpt.is_adapter and e.role is Role.FULL and e.module in lora_modules:
            # PEFT's copy of the base layer of a LoRA-targeted embedding (save_embedding_layers): not trained
            items[(e.target, "saved_base")] = _Item(e.target, "saved_base", e.module, (e,))
        else:  # BASE, FULL, BIAS: a stored tensor that is (or replaces) the base tensor
            items[(e.target, "tensor")] = _Item(e.target, "tensor", e.module, (e,))
    if not ckpt.is_adapter:
        _tied_head(ckpt, items)
    return items


def _tied_head(ckpt: Checkpoint, items: dict[tuple[str, str], _Item]) -> None:
    """A tied full model may store only the embedding; in memory its head *is* that matrix."""
    layout = ckpt.layout
    if not layout.embedding or not layout.head or ckpt.tie_word_embeddings is False:
        return
    emb, head = (f"{layout.embedding}.weight", "tensor"), (f"{layout.head}.weight", "tensor")
    if emb in items and head not in items:
        items[head] = _Item(head[0], "tensor", layout.head, items[emb].entries)


def _load(item: _Item) -> torch.Tensor:
    t = item.entries[0].load()
    if item.kind == "lora_bias":
        t = t.to(torch.float64) * (item.scaling or 1.0)
    return t


def _compare_items(x: _Item, y: _Item, atol: float, group: str, layer: int | None) -> TensorDiff:
    common = dict(
        name=x.name, kind=x.kind, group=group, layer=layer, shape_a=x.shape, shape_b=y.shape,
        dtype_a=x.dtype, dtype_b=y.dtype, keys_a=x.keys, keys_b=y.keys,
    )
    if x.shape != y.shape:
        return TensorDiff(status="shape", **common)
    note = ""
    if x.kind == "lora":
        ra, rb = x.pair.rank, y.pair.rank
        if ra != rb:
            note = f"rank {ra} -> {rb}"
        if x.experts or y.experts:
            max_abs, diff, norm_b = expert_effect_stats(
                x.pair.a.load(), x.pair.b.load(), x.scaling or 1.0, y.pair.a.load(), y.pair.b.load(), y.scaling or 1.0,
                x.experts or y.experts, atol=atol)
        else:
            max_abs, diff, norm_b = lora_effect_stats(
                x.pair.a.load(), x.pair.b.load(), x.scaling or 1.0, y.pair.a.load(), y.pair.b.load(), y.scaling or 1.0, atol=atol
            )
    else:
        if x.kind == "token_rows" and x.indices != y.indices:
            note = f"token indices {x.indices} -> {y.indices}"
        max_abs, diff, norm_b = tensor_stats(_load(x), _load(y))
    within = (max_abs is not None and max_abs <= atol) or (max_abs is None and diff <= atol)
    if within and not note.startswith("token indices"):
        status = "equal" if x.dtype == y.dtype else "dtype"
    else:
        status = "changed"
    return TensorDiff(status=status, max_abs=max_abs, diff_norm=diff, norm_b=norm_b, note=note, **common)


def _only(item: _Item, side: str, group: str, layer: int | None) -> TensorDiff:
    shape, dtype, keys = item.shape, item.dtype, item.keys
    if side == "a":
        return TensorDiff(item.name, item.kind, "only_a", group, layer, shape_a=shape, dtype_a=dtype, keys_a=keys)
    return TensorDiff(item.name, item.kind, "only_b", group, layer, shape_b=shape, dtype_b=dtype, keys_b=keys)


def _diff_items(a: Checkpoint, b: Checkpoint, atol: float, notes: list[str]) -> list[TensorDiff]:
    ia = _items(a, _Scaling(a, b, "A", notes))
    ib = _items(b, _Scaling(b, a, "B", notes))
    layout = a.layout if a.layout.name != "unknown" else b.layout
    rows = []
    for key in sorted(set(ia) | set(ib)):
        x, y = ia.get(key), ib.get(key)
        module = (x or y).module
        group, layer = layout.group(module), layout.layer_index(module)
        if (x is None or y is None) and (x or y).kind == "saved_base":
            notes.append(f"{'A' if x else 'B'} holds PEFT's saved copy of the base layer {(x or y).name} (save_embedding_layers): "
                         "not part of what was trained, not compared (pass --base to check it against the base)")
        elif x is None:
            rows.append(_only(y, "b", group, layer))
        elif y is None:
            rows.append(_only(x, "a", group, layer))
        else:
            rows.append(_compare_items(x, y, atol, group, layer))
    if any(e.role is Role.MAGNITUDE for c in (a, b) for e in c.entries):
        notes.append("DoRA: magnitudes are compared as stored; pass --base to compare effective weights")
    return rows


# --------------------------------------------------------------------------------------------------------------
# Effective weights (with a base)


class _Effective:
    """Effective weights of one side, one canonical tensor at a time: a merged model's own tensors, or
    base + this adapter's replacement / LoRA / DoRA / token rows applied (the merge math)."""

    def __init__(self, ckpt: Checkpoint, base: Checkpoint, base_tensors: dict[str, Entry], scaling: _Scaling,
                 device: torch.device = torch.device("cpu")):
        self.ckpt, self.base, self.base_tensors, self.scaling, self.device = ckpt, base, base_tensors, scaling, device
        self.own = {e.target: e for e in ckpt.entries} if not ckpt.is_adapter else {}
        self.by_target = ckpt.by_target() if ckpt.is_adapter else {}
        self.pairs = lora_pairs(ckpt.entries) if ckpt.is_adapter else {}
        self.settings = scaling.settings or ckpt.adapter
        layout = base.layout
        self.embed = f"{layout.embedding}.weight" if layout.embedding else None
        self.head = f"{layout.head}.weight" if layout.head else None

    def targets(self) -> set[str]:
        return set(self.own) if not self.ckpt.is_adapter else set(self.by_target)

    def keys(self, target: str) -> tuple[str, ...]:
        if not self.ckpt.is_adapter:
            e = self.own.get(target)
            return (e.key,) if e else ()
        return tuple(e.key for e in self.by_target.get(target, ()))

    def _base_tensor(self, target: str) -> torch.Tensor | None:
        e = self.base_tensors.get(target)
        if e is None and target == self.head and self.embed in self.base_tensors:
            e = self.base_tensors[self.embed]  # tied base: the head is the embedding matrix
        return e.load() if e is not None else None

    def has(self, target: str) -> bool:
        if not self.ckpt.is_adapter:
            return target in self.own or (target == self.head and self.embed in self.own)
        return target in self.by_target or target in self.base_tensors or (target == self.head and self.embed in self.base_tensors)

    def shape_dtype(self, target: str) -> tuple[tuple[int, ...] | None, str | None]:
        if not self.ckpt.is_adapter:
            e = self.own.get(target) or (self.own.get(self.embed) if target == self.head else None)
        else:
            full = [x for x in self.by_target.get(target, ()) if x.role in (Role.FULL, Role.BIAS)]
            e = full[0] if full else self.base_tensors.get(target) or (self.base_tensors.get(self.embed) if target == self.head else None)
        return (e.shape, e.dtype_name) if e is not None else (None, None)

    def load(self, target: str) -> torch.Tensor:
        if not self.ckpt.is_adapter:
            e = self.own.get(target) or self.own[self.embed]  # a tied merged model stores only the embedding
            return e.load()
        entries = self.by_target.get(target, [])
        if not entries:
            return self._base_tensor(target)
        module, _, param = target.rpartition(".")
        pair = self.pairs.get(f"{module}.weight") if param != "weight" else None
        return effective_weight(self._base_tensor(target), entries, scaling=self.scaling, settings=self.settings,
                                bias_rank=pair.rank if pair else None, device=self.device)


def _diff_effective(a: Checkpoint, b: Checkpoint, base: Checkpoint, atol: float, notes: list[str],
                    device: torch.device = torch.device("cpu")) -> list[TensorDiff]:
    base_tensors = {e.target: e for e in base.entries}
    sa, sb = _Scaling(a, b, "A", notes), _Scaling(b, a, "B", notes)
    ea, eb = _Effective(a, base, base_tensors, sa, device), _Effective(b, base, base_tensors, sb, device)
    if a.is_adapter and b.is_adapter:
        targets = ea.targets() | eb.targets()
    else:
        targets = set(base_tensors) | ea.targets() | eb.targets()
        notes.append("effective weights: every tensor of the base and the merged model(s) is compared")
    layout = base.layout
    rows = []
    for target in sorted(targets):
        module = target.rpartition(".")[0]
        group, layer = layout.group(module), layout.layer_index(module)
        sha, dta = ea.shape_dtype(target)
        shb, dtb = eb.shape_dtype(target)
        ka, kb = ea.keys(target), eb.keys(target)
        has_a, has_b = ea.has(target) and sha is not None, eb.has(target) and shb is not None
        if not has_a or not has_b:
            if has_a:
                rows.append(TensorDiff(target, "effective", "only_a", group, layer, shape_a=sha, dtype_a=dta, keys_a=ka))
            elif has_b:
                rows.append(TensorDiff(target, "effective", "only_b", group, layer, shape_b=shb, dtype_b=dtb, keys_b=kb))
            else:
                rows.append(TensorDiff(target, "effective", "only_a" if ka else "only_b", group, layer, keys_a=ka, keys_b=kb, note="not in the base"))
            continue
        common = dict(group=group, layer=layer, shape_a=sha, shape_b=shb, dtype_a=dta, dtype_b=dtb, keys_a=ka, keys_b=kb)
        if sha != shb:
            rows.append(TensorDiff(target, "effective", "shape", **common))
            continue
        max_abs, diff, norm_b = tensor_stats(ea.load(target), eb.load(target))
        status = ("equal" if dta == dtb else "dtype") if max_abs <= atol else "changed"
        rows.append(TensorDiff(target, "effective", status, max_abs=max_abs, diff_norm=diff, norm_b=norm_b, **common))
    return rows


# --------------------------------------------------------------------------------------------------------------
# Entry point


def _open(x: Checkpoint | str | Path, opened: list[Checkpoint], **kw) -> Checkpoint:
    if isinstance(x, Checkpoint):
        return x
    c = open_checkpoint(x, **kw)
    opened.append(c)
    return c


@torch.no_grad()
def diff_checkpoints(
    a: Checkpoint | str | Path,
    b: Checkpoint | str | Path,
    *,
    base: Checkpoint | str | Path | None = None,
    atol: float = 0.0,
    adapter_config: str | Path | None = None,
    lora_alpha: float | None = None,
    device: str | torch.device | None = "auto",
) -> DiffReport:
    """Compare A with B (B is the reference for relative change). Paths are opened and closed here.

    ``adapter_config``/``lora_alpha`` apply to ``.pth`` inputs that lack LoRA settings. ``device`` runs the
    LoRA/DoRA products of effective weights (with ``base``; ``auto``: CUDA when present). Raises
    ``UsageError`` for comparisons that cannot be made (an adapter against a merged model without a base).
    """
    if atol < 0 or math.isnan(atol):
        raise UsageError(f"--atol must be >= 0, got {atol}")
    dev = resolve_device(device)
    opened: list[Checkpoint] = []
    try:
        ca = _open_side(a, opened, adapter_config, lora_alpha)
        cb = _open_side(b, opened, adapter_config, lora_alpha)
        cbase = _open(base, opened) if base is not None else None
        if cbase is not None and cbase.is_adapter:
            raise UsageError(f"--base must be a full model, {cbase.path} is an adapter")
        notes: list[str] = []
        if cbase is None:
            if ca.is_adapter != cb.is_adapter:
                raise UsageError("comparing an adapter with a merged model needs --base BASE (effective weights)")
            mode = "adapter" if ca.is_adapter else "tensor"
            rows = _diff_items(ca, cb, atol, notes)
        else:
            mode = "effective"
            rows = _diff_effective(ca, cb, cbase, atol, notes, dev)
        rows.sort(key=sort_key)
        config = config_changes(ca.config, cb.config) if not ca.is_adapter and not cb.is_adapter else []
        return DiffReport(str(ca.path), str(cb.path), str(cbase.path) if cbase else None, mode, atol, rows, notes, config)
    finally:
        for c in opened:
            c.close()


def _open_side(x, opened, adapter_config, lora_alpha) -> Checkpoint:
    if isinstance(x, Checkpoint):
        return x
    p = Path(x)
    kw = {}
    if (adapter_config is not None or lora_alpha is not None) and p.exists() and detect_format(p) == "pth":
        kw = {"adapter_config": adapter_config, "lora_alpha": lora_alpha}
    return _open(p, opened, **kw)
