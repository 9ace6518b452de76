"""The merge plan: for every tensor of the base file, what the merged output holds -- or a refusal.

:func:`plan_merge` reads headers (and the adapter's small tensors, to check them) and decides per base
tensor: the base bytes unchanged, a replacement (modules_to_save, saved bias), a LoRA/DoRA merge, replaced
token rows. Every problem is collected and reported with its keys before anything is written; the
executor in ``merge.py`` then only streams.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import AdapterConfigError, CheckpointError, UsageError
from . import merge_math as mm
from .view import Checkpoint, Entry, Role, open_checkpoint
from .shards import TensorSpec

__all__ = [
    "MergeError",
    "LoraOp",
    "BiasOp",
    "TensorPlan",
    "MergePlan",
    "plan_merge",
    "parse_dtype",
    "open_base",
    "open_adapter",
    "TensorReader",
    "CHUNK_ELEMENTS",
]

_DTYPES = {
    "auto": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
    "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}
_DTYPE_CONFIG_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
CHUNK_ELEMENTS = 1 << 21  # elements per row chunk: ~24 MB of buffers, small enough to stay in cache
_MAX_LISTED = 12
_SMALL_ROLES = frozenset({Role.LORA_A, Role.LORA_B, Role.LORA_BIAS, Role.EMB_A, Role.EMB_B, Role.MAGNITUDE, Role.TOKEN_ROWS})


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


# --------------------------------------------------------------------------------------------------------------
# Reading tensors: byte ranges of safetensors files (pread, chunkable), else the view's own loader


class TensorReader:
    """Reads stored tensors whole or by rows without the view's whole-tensor copy.

    For safetensors files it knows each tensor's byte range (from the validated header) and reads rows
    with ``pread`` into a fresh buffer; other formats fall back to ``Entry.load`` (mmap'd pickles).
    """

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self._fds: dict[Path, int] = {}

    @staticmethod
    def location(entry: Entry) -> tuple[Path, int] | None:
        return entry.location

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def rows(self, entry: Entry, start: int, stop: int, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``start:stop`` (dim 0) in the stored dtype: a new tensor, or a view of ``buffer`` (uint8, reused)."""
        loc = self.location(entry)
        if loc is None:
            return entry.load()[start:stop]
        path, offset = loc
        row_elems = math.prod(entry.shape[1:]) if len(entry.shape) > 1 else 1
        itemsize = entry.dtype.itemsize
        shape = (stop - start,) + tuple(entry.shape[1:]) if entry.shape else ()
        nbytes = math.prod(shape) * itemsize
        if buffer is not None and buffer.numel() >= nbytes:
            out = buffer[:nbytes].view(entry.dtype).view(shape)
        else:
            out = torch.empty(shape, dtype=entry.dtype)
        want = out.numel() * itemsize
        if want:
            view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
            fd, pos, done = self._fd(path), offset + start * row_elems * itemsize, 0
            while done < want:
                n = os.preadv(fd, [view[done:]], pos + done)
                if n == 0:
                    raise CheckpointError(f"{path.name}: file ended inside tensor {entry.key!r}")
                done += n
        return out

    def whole(self, entry: Entry) -> torch.Tensor:
        if not entry.shape:
            t = entry.load()
            return t.clone() if self.location(entry) is None else t
        return self.rows(entry, 0, entry.shape[0])

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


# --------------------------------------------------------------------------------------------------------------
# The plan


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


def open_base(base: str | Path) -> Checkpoint:
    ckpt = open_checkpoint(base)
    if ckpt.format != "merged":
        ckpt.close()
        raise UsageError(f"{base} is a {ckpt.format} checkpoint; BASE must be a full model (HF dir or .safetensors)")
    return ckpt


def open_adapter(src: str | Path, base: Checkpoint | None = None, *, adapter_config=None, lora_alpha=None) -> Checkpoint:
    ckpt = open_checkpoint(src, adapter_config=adapter_config, lora_alpha=lora_alpha, layout=base.layout if base is not None else None)
    if not ckpt.is_adapter:
        ckpt.close()
        raise UsageError(f"{src} is a full model, not an adapter; SRC must be a PEFT adapter dir or a .pth dump")
    return ckpt


def _refuse_settings(ckpt: Checkpoint) -> None:
    a = ckpt.adapter
    errors = [f for f in ckpt.findings if f.severity == "error"]
    if errors:
        raise MergeError(f"{ckpt.path.name}: {errors[0].message}", [(k, errors[0].code) for k in errors[0].keys])
    if a is None:
        return
    if a.unsafe_init:
        raise AdapterConfigError(
            f"init_lora_weights={a.unsafe_init!r} rewrote the base weights during training; this adapter only fits that "
            "residual base (save it with path_initial_model_for_weight_conversion to get a normal LoRA)"
        )
    if a.layer_replication:
        raise AdapterConfigError("layer_replication changes the model's layer structure; merging it is not supported")
    if a.raw.get("target_parameters"):
        raise AdapterConfigError("target_parameters (LoRA on raw parameters, e.g. MoE experts) is not supported")


def _embed_head_targets(base: Checkpoint, targets: dict[str, Entry]) -> tuple[str | None, str | None]:
    layout = base.layout
    emb = f"{layout.embedding}.weight" if layout.embedding else None
    head = f"{layout.head}.weight" if layout.head else None
    if emb is None or emb not in targets:
        emb = next((t for t in targets if t.endswith(("embed_tokens.weight", ".wte.weight"))), emb)
    if head is None:
        head = "lm_head.weight"
    return emb, head


def _disk_name(base: Checkpoint, target: str, emb_target: str | None, emb_entry: Entry | None) -> str:
    """The base file's naming for a tensor it does not hold (the untied head)."""
    module, _, param = target.rpartition(".")
    if emb_entry is not None and emb_target is not None and emb_entry.key != emb_target:
        module = base.layout.disk(module)  # the file uses the hub (legacy) naming
    return f"{module}.{param}"


def _few(items: list[tuple[str, str]]) -> str:
    shown = "; ".join(f"{k}: {why}" for k, why in items[:_MAX_LISTED])
    more = f"; ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return shown + more


def _finite_chunks(reader: TensorReader, e: Entry) -> bool:
    if not e.dtype.is_floating_point:
        return True
    if len(e.shape) < 2:
        return mm.all_finite(reader.whole(e))
    step = max(1, CHUNK_ELEMENTS // max(1, math.prod(e.shape[1:])))
    return all(mm.all_finite(reader.rows(e, i, min(e.shape[0], i + step))) for i in range(0, e.shape[0], step))


def _equal_entries(reader: TensorReader, x: Entry, y: Entry) -> bool:
    if x.shape != y.shape or x.dtype != y.dtype:
        return False
    if len(x.shape) < 2:
        return torch.equal(reader.whole(x), reader.whole(y))
    step = max(1, CHUNK_ELEMENTS // max(1, math.prod(x.shape[1:])))
    return all(torch.equal(reader.rows(x, i, min(x.shape[0], i + step)), reader.rows(y, i, min(y.shape[0], i + step))) for i in range(0, x.shape[0], step))


@dataclass
class _Ops:
    """Everything the adapter does to one canonical base tensor (collected before planning)."""

    replace: Entry | None = None
    lora: LoraOp | None = None
    bias_lora: BiasOp | None = None
    rows: tuple[Entry, tuple[int, ...]] | None = None

    @property
    def empty(self) -> bool:
        return self.replace is None and self.lora is None and self.bias_lora is None and self.rows is None


def plan_merge(
    src: str | Path | Checkpoint,
    base: str | Path | Checkpoint,
    *,
    adapter_config: str | Path | None = None,
    lora_alpha: float | None = None,
    dtype: str | torch.dtype | None = "auto",
    check_values: bool = True,
) -> MergePlan:
    """Decide every output tensor, or raise :class:`MergeError` listing every adapter entry that does not fit.

    Reads headers, plus the adapter's tensors when ``check_values`` (empty, NaN/Inf). Never writes.
    """
    out_dtype = parse_dtype(dtype)
    base_ckpt = base if isinstance(base, Checkpoint) else open_base(base)
    try:
        ad = src if isinstance(src, Checkpoint) else open_adapter(src, base_ckpt, adapter_config=adapter_config, lora_alpha=lora_alpha)
    except BaseException:
        if not isinstance(base, Checkpoint):
            base_ckpt.close()
        raise
    try:
        return _plan(base_ckpt, ad, out_dtype, check_values)
    except BaseException:
        if not isinstance(src, Checkpoint):
            ad.close()
        if not isinstance(base, Checkpoint):
            base_ckpt.close()
        raise


def _plan(base: Checkpoint, ad: Checkpoint, out_dtype: torch.dtype | None, check_values: bool) -> MergePlan:
    _refuse_settings(ad)
    settings = ad.adapter
    problems: list[tuple[str, str]] = []
    notes: list[str] = []

    by_target = base.by_target()
    dup = [(es[0].key, f"the base holds {len(es)} tensors with this name ({', '.join(e.key for e in es)})") for es in by_target.values() if len(es) > 1]
    if dup:
        raise MergeError(f"ambiguous base: {_few(dup)}", dup)
    targets: dict[str, Entry] = {t: es[0] for t, es in by_target.items()}
    emb_t, head_t = _embed_head_targets(base, targets)
    flag = base.tie_word_embeddings
    head_in_file = head_t in targets
    tied = bool(flag) if flag is not None else (not head_in_file and emb_t in targets)
    head_alias = tied and not head_in_file and emb_t in targets  # in memory lm_head.weight *is* the embedding

    def base_entry(target: str) -> Entry | None:
        if target in targets:
            return targets[target]
        if head_alias and target == head_t:
            return targets[emb_t]
        return None

    readers = {"base": TensorReader(base), "adapter": TensorReader(ad)}
    ar = readers["adapter"]
    try:
        # -- every adapter entry must be usable and resolve to a base tensor -----------------------------
        def value(e: Entry) -> torch.Tensor:  # read, check, drop: the plan keeps no tensor data
            return ar.whole(e)

        for e in ad.entries:
            if 0 in e.shape or (e.role in (Role.LORA_A, Role.LORA_B, Role.EMB_A, Role.EMB_B) and len(e.shape) < 2):
                problems.append((e.key, f"empty or flattened tensor {list(e.shape)} (an un-gathered ZeRO-3/FSDP shard?)"))
            elif check_values and e.dtype.is_floating_point:
                small = e.role in _SMALL_ROLES or e.nbytes <= (64 << 20)
                ok = mm.all_finite(value(e)) if small else _finite_chunks(ar, e)
                if not ok:
                    problems.append((e.key, "contains NaN or Inf"))
            if base_entry(e.target) is None:
                problems.append((e.key, f"no base tensor {e.target!r}" + _hint_missing(e, targets)))

        ops: dict[str, _Ops] = {}
        modules: dict[str, dict[Role, Entry]] = {}
        for e in ad.entries:
            if e.role in (Role.FULL, Role.BIAS):
                o = ops.setdefault(e.target, _Ops())
                if o.replace is not None:
                    problems.append((e.key, f"a second replacement for {e.target!r} (also {o.replace.key!r})"))
                    continue
                want = base_entry(e.target)
                if want is not None and want.shape != e.shape:
                    problems.append((e.key, f"shape {list(e.shape)} but the base has {list(want.shape)}" + _vocab_hint(e, want, emb_t, head_t)))
                o.replace = e
            elif e.role is Role.TOKEN_ROWS:
                idx = settings.token_indices(e.source_module) if settings is not None else None
                want = base_entry(e.target)
                if idx is None:
                    problems.append((e.key, "trainable-token rows but no trainable_token_indices for this module in the adapter config"))
                elif len(e.shape) != 2 or e.shape[0] != len(idx):
                    problems.append((e.key, f"{e.shape[0] if e.shape else 0} rows for {len(idx)} token indices"))
                elif want is not None and (len(want.shape) != 2 or want.shape[1] != e.shape[1] or max(idx) >= want.shape[0]):
                    problems.append((e.key, f"rows {list(e.shape)} (max index {max(idx)}) do not fit the base {list(want.shape)}"))
                else:
                    ops.setdefault(e.target, _Ops()).rows = (e, tuple(idx))
            else:
                roles = modules.setdefault(e.module, {})
                if e.role in roles:
                    problems.append((e.key, f"a second {e.role.value} for module {e.module!r}"))
                roles[e.role] = e

        for module, roles in modules.items():
            _plan_lora(module, roles, settings, base_entry, ops, problems, value, ad.format)

        if problems:
            raise MergeError(
                f"{len(problems)} adapter entr{'y' if len(problems) == 1 else 'ies'} cannot be merged onto {base.path.name}: {_few(problems)}",
                problems,
            )

        # -- tied embedding / head: follow the trained (unmerged) model ----------------------------------
        untie = False
        emb_ops, head_ops = ops.get(emb_t, _Ops()), ops.get(head_t, _Ops())
        if tied and emb_t in targets:
            if head_ops.rows is None and emb_ops.rows is not None:
                head_ops.rows = emb_ops.rows  # PEFT ties the head's token wrapper to the embedding's
                ops[head_t] = head_ops
            if not _same_effect(emb_ops, head_ops, readers, value):
                untie = True
                notes.append(
                    "embedding and lm_head differ after the merge: both written, tie_word_embeddings set to false"
                    + (" (the trained model's head used the base embedding; PEFT's merge_and_unload would change it)"
                       if emb_ops.lora is not None and head_ops.empty else "")
                )

        # -- the output tensors, in the base file's byte order (sequential reads, kernel copies) ----------
        br = readers["base"]
        order = sorted(
            base.entries,
            key=lambda e: (str(br.location(e)[0]), br.location(e)[1]) if br.location(e) else ("~", 0),
        )
        plans: list[TensorPlan] = []
        emb_entry = targets.get(emb_t)
        for e in order:
            start = emb_entry if (tied and e.target == head_t and emb_entry is not None) else e  # tied: the head *is* the embedding
            plans.append(_tensor_plan(e.key, e.target, start, ops.get(e.target), out_dtype))
            if untie and head_alias and e.target == emb_t:
                name = _disk_name(base, head_t, emb_t, emb_entry)
                tp = _tensor_plan(name, head_t, e, ops.get(head_t), out_dtype)
                tp.added = True
                plans.append(tp)
        config = _out_config(base.config, untie, out_dtype)
        return MergePlan(base, ad, plans, config, tied, untie, notes, readers)
    except BaseException:
        for r in readers.values():
            r.close()
        raise


def _hint_missing(e: Entry, targets: dict[str, Entry]) -> str:
    leaf = e.target.split(".")[-2:] if "." in e.target else [e.target]
    similar = [t for t in targets if t.endswith(".".join(leaf))]
    return f" (the base has e.g. {similar[0]!r}: a different model family or depth?)" if similar else " (wrong base?)"


def _vocab_hint(e: Entry, want: Entry, emb_t: str | None, head_t: str | None) -> str:
    if e.target in (emb_t, head_t) and len(e.shape) == 2 and len(want.shape) == 2 and e.shape[1] == want.shape[1]:
        return " (resized vocabulary: merge onto the base with the resized embedding)"
    return ""


def _plan_lora(module, roles, settings, base_entry, ops, problems, value, fmt) -> None:
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
    w = base_entry(target)
    if w is None:
        return  # already reported
    rank = a.shape[0]
    if b.shape[1] != rank:
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
    scaling = settings.scaling(a.source_module, rank)
    fifo = False
    if a.role is Role.EMB_A:
        kind: mm.Kind = "embedding"
        if len(w.shape) != 2 or a.shape != (rank, w.shape[0]) or b.shape != (w.shape[1], rank):
            problems.append((a.key, f"embedding LoRA A {list(a.shape)} / B {list(b.shape)} does not fit the base {list(w.shape)}"))
            return
        out_features = w.shape[1]
    elif len(a.shape) == 2:
        kind = "linear"
        f = mm.fan_in_fan_out_from_shape(w.shape, a.shape, b.shape, hint=bool(settings.fan_in_fan_out))
        if f is None:
            problems.append((a.key, f"LoRA A {list(a.shape)} / B {list(b.shape)} does not fit the base {list(w.shape)}"))
            return
        fifo, out_features = f, b.shape[0]
    else:
        kind = "conv"
        if len(w.shape) != len(a.shape) or w.shape[0] != b.shape[0] or tuple(a.shape[2:]) != tuple(w.shape[2:]) or any(s != 1 for s in b.shape[2:]) or len(b.shape) != len(w.shape):
            problems.append((a.key, f"conv LoRA A {list(a.shape)} / B {list(b.shape)} does not fit the base {list(w.shape)}"))
            return
        if a.shape[1] != w.shape[1]:
            problems.append((a.key, f"conv LoRA A {list(a.shape)} on a grouped conv {list(w.shape)} (groups > 1 cannot be merged)"))
            return
        out_features = w.shape[0]
    if mag is not None and math.prod(mag.shape) != out_features:
        problems.append((mag.key, f"DoRA magnitude {list(mag.shape)} does not fit {out_features} output features"))
        return
    op = LoraOp(kind, a, b, scaling, rank, fifo, mag)
    o = ops.setdefault(target, _Ops())
    o.lora = op
    if bias_b is not None:
        bias_target = f"{module}.bias"
        bw = base_entry(bias_target)
        if mag is not None:
            problems.append((bias_b.key, "lora_bias together with DoRA cannot be merged (PEFT refuses it too)"))
        elif bw is None:
            problems.append((bias_b.key, f"lora_B.bias but the base has no {bias_target!r}"))
        elif tuple(bias_b.shape) != tuple(bw.shape):
            problems.append((bias_b.key, f"shape {list(bias_b.shape)} but the base bias has {list(bw.shape)}"))
        else:
            ops.setdefault(bias_target, _Ops()).bias_lora = BiasOp(bias_b, scaling)


def _same_effect(x: _Ops, y: _Ops, readers: dict[str, TensorReader], value) -> bool:
    """Do the embedding's and the head's changes give the same tensor (so the tie can stay)?

    Conservative: True only when it is certain (nothing on either side, equal replacements, the mirrored
    LoRA of ``ensure_weight_tying``, identical token rows). Anything else unties, which is always faithful.
    """
    if x.empty and y.empty:
        return True
    if x.bias_lora is not None or y.bias_lora is not None:
        return False
    if (x.replace is None) != (y.replace is None) or (x.rows is None) != (y.rows is None) or (x.lora is None) != (y.lora is None):
        return False
    ar = readers["adapter"]
    if x.replace is not None and not _equal_entries(ar, x.replace, y.replace):
        return False
    if x.rows is not None:
        if x.rows[1] != y.rows[1] or not (x.rows[0] is y.rows[0] or _equal_entries(ar, x.rows[0], y.rows[0])):
            return False
    if x.lora is not None:
        e, h = x.lora, y.lora
        if e.dora or h.dora or e.scaling != h.scaling:
            return False
        if e.kind == "embedding" and h.kind == "linear" and not h.fan_in_fan_out:
            # ensure_weight_tying: the head's LoRA is the embedding's, transposed (lora_A = B_e.T, lora_B = A_e.T)
            return torch.equal(value(h.a), value(e.b).T) and torch.equal(value(h.b), value(e.a).T)
        return False
    return True


def _tensor_plan(name: str, target: str, base_e: Entry, o: _Ops | None, out_dtype: torch.dtype | None) -> TensorPlan:
    src = o.replace if o is not None and o.replace is not None else base_e
    dt = out_dtype if out_dtype is not None and base_e.dtype.is_floating_point else base_e.dtype
    tp = TensorPlan(name, target, tuple(base_e.shape), dt, src, replaced=src is not base_e)
    if o is not None:
        tp.lora, tp.bias_lora, tp.rows = o.lora, o.bias_lora, o.rows
    return tp


def _out_config(config: dict | None, untie: bool, out_dtype: torch.dtype | None) -> dict | None:
    if config is None:
        return None
    cfg = copy.deepcopy(config)
    subs = [cfg] + [v for v in cfg.values() if isinstance(v, dict)]
    if untie:
        cfg["tie_word_embeddings"] = False
        text = cfg.get("text_config")
        if isinstance(text, dict):
            text["tie_word_embeddings"] = False
    if out_dtype is not None:
        for d in subs:
            for key in ("torch_dtype", "dtype"):
                if key in d and isinstance(d[key], (str, type(None))):
                    d[key] = _DTYPE_CONFIG_NAMES[out_dtype]
        if not any(k in cfg for k in ("torch_dtype", "dtype")):
            cfg["dtype"] = _DTYPE_CONFIG_NAMES[out_dtype]
    return cfg
