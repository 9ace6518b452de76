"""The merge plan: for every tensor of the base file, what the merged output holds -- or a refusal.

:func:`plan_merge` reads headers (and the adapter's small tensors, to check them) and decides per base
tensor: the base bytes unchanged, a replacement (modules_to_save, saved bias), a LoRA/DoRA merge, replaced
token rows. Every problem is collected and reported with its keys before anything is written; the
executor in ``merge.py`` then only streams.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from ..errors import AdapterConfigError, UsageError
from . import merge_math as mm
from .declared import WAYS_OUT, undelivered
from .merge_lora import plan_lora
from .merge_ops import DTYPE_CONFIG_NAMES, MergeError, MergePlan, TargetOps, TensorPlan, parse_dtype
from .reader import TensorReader, all_finite_rows, equal_rows
from .view import Checkpoint, Entry, Role, open_checkpoint
from .tokenizer_files import unsaved_resize
from .vocab import SAVE_FIX, VocabResize, resolve_vocab

__all__ = ["plan_merge", "open_base", "open_adapter"]

_MAX_LISTED = 12
_SMALL_ROLES = frozenset({Role.LORA_A, Role.LORA_B, Role.LORA_BIAS, Role.EMB_A, Role.EMB_B, Role.MAGNITUDE, Role.TOKEN_ROWS})


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
    missing = undelivered(ad, {e.module for e in base.entries} | {base.layout.head or ""})
    if missing:
        raise MergeError(f"{ad.path.name}: declares {', '.join(missing)} in modules_to_save/trainable tokens but holds "
                         f"no weights for them (saved keeping only 'lora_' keys, like Qwen-VL finetune.py); a merge would "
                         f"keep the base's untrained modules. {WAYS_OUT}", [(m, "no weights in the adapter") for m in missing])
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
                ok = mm.all_finite(value(e)) if small else all_finite_rows(ar, e)
                if not ok:
                    problems.append((e.key, "contains NaN or Inf"))
            if base_entry(e.target) is None:
                problems.append((e.key, f"no base tensor {e.target!r}" + _hint_missing(e, targets)))

        # -- a resized vocabulary (new tokens): the adapter's rows replace the base's for embedding and head --
        emb_rows_module = next((e.source_module for e in ad.entries if e.role is Role.TOKEN_ROWS and e.target == emb_t), None)

        def token_ids(e: Entry) -> list[int] | None:
            if settings is None:
                return None
            idx = settings.token_indices(e.source_module)
            if idx is None and tied and e.target == head_t and emb_rows_module is not None:
                idx = settings.token_indices(emb_rows_module)  # the tied head's wrapper shares the embedding's ids
            return idx

        emb_base = base_entry(emb_t) if emb_t else None
        resize, vocab_problems = resolve_vocab(ad.entries, emb_t, head_t, emb_base.shape if emb_base is not None else None,
                                               tied=tied, token_indices=token_ids)
        problems += vocab_problems
        reported = {k for k, _ in vocab_problems}
        if resize is None and not vocab_problems and emb_base is not None:
            lost = unsaved_resize(ad.path, emb_base.shape[0], SAVE_FIX)
            if lost:
                raise MergeError(lost, [(str(ad.path), lost)])

        def shape_of(target: str) -> tuple[int, ...] | None:
            """The shape the adapter acts on: the base's, or the resized rows for embedding and head."""
            if resize is not None and target in (emb_t, head_t):
                return (resize.rows, emb_base.shape[1])
            w = base_entry(target)
            return tuple(w.shape) if w is not None else None

        ops: dict[str, TargetOps] = {}
        modules: dict[str, dict[Role, Entry]] = {}
        for e in ad.entries:
            if e.key in reported:
                continue
            if e.role in (Role.FULL, Role.BIAS):
                o = ops.setdefault(e.target, TargetOps())
                if o.replace is not None:
                    problems.append((e.key, f"a second replacement for {e.target!r} (also {o.replace.key!r})"))
                    continue
                want = shape_of(e.target)
                if want is not None and want != e.shape:
                    problems.append((e.key, f"shape {list(e.shape)} but the base has {list(want)}"))
                o.replace = e
            elif e.role is Role.TOKEN_ROWS:
                idx = token_ids(e)
                want = shape_of(e.target)
                if idx is None:
                    problems.append((e.key, "trainable-token rows but no trainable_token_indices for this module in the adapter config"))
                elif len(e.shape) != 2 or e.shape[0] != len(idx):
                    problems.append((e.key, f"{e.shape[0] if e.shape else 0} rows for {len(idx)} token indices"))
                elif want is not None and (len(want) != 2 or want[1] != e.shape[1] or max(idx) >= want[0]):
                    problems.append((e.key, f"rows {list(e.shape)} (max index {max(idx)}) do not fit the base {list(want)}"))
                else:
                    ops.setdefault(e.target, TargetOps()).rows = (e, tuple(idx))
            else:
                roles = modules.setdefault(e.target if e.param_wrapper else e.module, {})
                if e.role in roles:
                    problems.append((e.key, f"a second {e.role.value} for module {e.module!r}"))
                roles[e.role] = e

        for module, roles in modules.items():
            plan_lora(module, roles, settings, shape_of, ops, problems, value, ad.format, base.layout, base_entry)

        if problems:
            raise MergeError(
                f"{len(problems)} adapter entr{'y' if len(problems) == 1 else 'ies'} cannot be merged onto {base.path.name}: {_few(problems)}",
                problems,
            )

        # -- tied embedding / head: follow the trained (unmerged) model ----------------------------------
        untie = False
        emb_ops, head_ops = ops.setdefault(emb_t, TargetOps()), ops.setdefault(head_t, TargetOps())
        if resize is not None:
            _follow_tied(resize, emb_ops, head_ops)
            notes.append(_vocab_note(resize))
        if tied and emb_t in targets:
            if head_ops.rows is None and emb_ops.rows is not None:
                head_ops.rows = emb_ops.rows  # PEFT ties the head's token wrapper to the embedding's
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
        config = _out_config(base.config, untie, out_dtype, resize.rows if resize is not None else None)
        return MergePlan(base, ad, plans, config, tied, untie, notes, readers, vocab=resize)
    except BaseException:
        for r in readers.values():
            r.close()
        raise


def _hint_missing(e: Entry, targets: dict[str, Entry]) -> str:
    leaf = e.target.split(".")[-2:] if "." in e.target else [e.target]
    similar = [t for t in targets if t.endswith(".".join(leaf))]
    return f" (the base has e.g. {similar[0]!r}: a different model family or depth?)" if similar else " (wrong base?)"


def _follow_tied(resize: VocabResize, emb_ops: TargetOps, head_ops: TargetOps) -> None:
    """On a tied base, a side the adapter did not save follows the other's saved base layer (PEFT tied the
    wrapped module's base layer to it in memory)."""
    if resize.head is None and head_ops.replace is None:
        head_ops.replace = emb_ops.replace
    if resize.embed is None and emb_ops.replace is None:
        emb_ops.replace = head_ops.replace


def _vocab_note(resize: VocabResize) -> str:
    how = "grown" if resize.grown else "shrunk"
    return (f"vocabulary {how} from {resize.base_rows} to {resize.rows} rows: embedding and lm_head taken from the adapter, "
            f"vocab_size set to {resize.rows}")


def _same_effect(x: TargetOps, y: TargetOps, readers: dict[str, TensorReader], value) -> bool:
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
    if x.replace is not None and not equal_rows(ar, x.replace, y.replace):
        return False
    if x.rows is not None:
        if x.rows[1] != y.rows[1] or not (x.rows[0] is y.rows[0] or equal_rows(ar, x.rows[0], y.rows[0])):
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


def _tensor_plan(name: str, target: str, base_e: Entry, o: TargetOps | None, out_dtype: torch.dtype | None) -> TensorPlan:
    src = o.replace if o is not None and o.replace is not None else base_e
    dt = out_dtype if out_dtype is not None and base_e.dtype.is_floating_point else base_e.dtype
    tp = TensorPlan(name, target, tuple(src.shape), dt, src, replaced=src is not base_e)  # a resized vocab: the adapter's rows
    if o is not None:
        tp.lora, tp.bias_lora, tp.rows = o.lora, o.bias_lora, o.rows
    return tp


def _out_config(config: dict | None, untie: bool, out_dtype: torch.dtype | None, vocab_rows: int | None = None) -> dict | None:
    if config is None:
        return None
    cfg = copy.deepcopy(config)
    subs = [cfg] + [v for v in cfg.values() if isinstance(v, dict)]
    if vocab_rows is not None:
        cfg["vocab_size"] = vocab_rows
        text = cfg.get("text_config")
        if isinstance(text, dict):
            text["vocab_size"] = vocab_rows
    if untie:
        cfg["tie_word_embeddings"] = False
        text = cfg.get("text_config")
        if isinstance(text, dict):
            text["tie_word_embeddings"] = False
    if out_dtype is not None:
        for d in subs:
            for key in ("torch_dtype", "dtype"):
                if key in d and isinstance(d[key], (str, type(None))):
                    d[key] = DTYPE_CONFIG_NAMES[out_dtype]
        if not any(k in cfg for k in ("torch_dtype", "dtype")):
            cfg["dtype"] = DTYPE_CONFIG_NAMES[out_dtype]
    return cfg
