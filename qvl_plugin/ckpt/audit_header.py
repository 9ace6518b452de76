"""Audit checks that read headers only: shapes and names against the base, empty tensors, dump loading
under ``strict=False``, tied embedding/head, missing scaling, engines that refuse modules_to_save."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..errors import CheckpointError
from .declared import undelivered_finding
from .pairs import LoraPair, lora_pairs
from .findings import few as _few
from .findings import finding as _finding
from .keys import PEFT_PREFIX
from .safety import read_json
from .param_targets import param_shape_problem
from .tokenizer_files import tokenizer_fit, unsaved_resize
from .view import Checkpoint, Entry, Finding, Role
from .vocab import SAVE_FIX, VocabResize, resolve_vocab

__all__ = ["BaseFacts", "header_checks"]


class BaseFacts:
    """The plain base model's tensors by canonical name, with the tied head resolved to the embedding."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.entries: dict[str, Entry] = {e.target: e for e in ckpt.entries}
        layout = ckpt.layout
        self.embed = f"{layout.embedding}.weight" if layout.embedding else None
        self.head = f"{layout.head}.weight" if layout.head else None
        self.head_missing = bool(self.head and self.head not in self.entries and self.embed in self.entries)
        flag = ckpt.tie_word_embeddings
        self.tied = bool(flag) if flag is not None else self.head_missing
        if self.head_missing:
            self.entries[self.head] = self.entries[self.embed]  # tied: in memory lm_head.weight is the embedding

    def shape(self, target: str) -> tuple[int, ...] | None:
        e = self.entries.get(target)
        return e.shape if e is not None else None

    def state_dict_keys(self) -> set[str]:
        """What ``load_state_dict`` would see: the file's own keys and the in-memory (canonical) names."""
        return {e.key for e in self.ckpt.entries} | set(self.entries)


def _adapter_tied(ckpt: Checkpoint) -> bool | None:
    """Tie flag of the adapter's base when only its local config is at hand (no --base)."""
    a = ckpt.adapter
    if a is None or not a.base_model_name_or_path:
        return None
    try:
        p = Path(a.base_model_name_or_path) / "config.json"
        cfg = read_json(p) if p.is_file() else None
    except (OSError, CheckpointError):
        return None
    if not isinstance(cfg, dict):
        return None
    if "tie_word_embeddings" in cfg:
        return bool(cfg["tie_word_embeddings"])
    text = cfg.get("text_config")
    if isinstance(text, dict) and "tie_word_embeddings" in text:
        return bool(text["tie_word_embeddings"])
    return None


# --------------------------------------------------------------------------------------------------------------
# Header-only checks


def header_checks(ckpt: Checkpoint, base_ckpt: Checkpoint | None) -> list[Finding]:
    out: list[Finding] = []
    entries = ckpt.entries
    empty = [e.key for e in entries if e.numel == 0]
    if empty:
        out.append(
            _finding(
                "empty-tensor",
                f"{len(empty)} zero-element tensors ({_few(empty)}): saved from ungathered DeepSpeed ZeRO-3 shards? "
                "Re-save with stage3_gather_16bit_weights_on_model_save",
                empty,
            )
        )
    pairs = lora_pairs(entries)
    if ckpt.is_adapter:
        if ckpt.format == "pth" and pairs and (ckpt.adapter is None or ckpt.adapter.lora_alpha is None):
            out.append(
                _finding(
                    "missing-scaling",
                    f"dump with {len(pairs)} LoRA pairs but no lora_alpha: the scaling alpha/r is unknown "
                    "(pass --adapter-config or --lora-alpha to merge or convert it)",
                )
            )
        if ckpt.format == "pth":
            out += _strict_false(ckpt, BaseFacts(base_ckpt) if base_ckpt is not None else None)
    gone = undelivered_finding(ckpt, {e.module for e in base_ckpt.entries} | {base_ckpt.layout.head or ""} if base_ckpt is not None else None)
    if gone is not None:
        out.append(gone)
    if base_ckpt is not None:
        b = BaseFacts(base_ckpt)
        out += _vs_base(ckpt, b, pairs) if ckpt.is_adapter else _merged_vs_base(ckpt, b)
        out += _tied(ckpt, b.tied, b, pairs)
    elif ckpt.is_adapter:
        out += _tied(ckpt, _adapter_tied(ckpt), None, pairs)
    return out


def _never_plain(e: Entry) -> bool:
    """True when a key can never name a parameter of the plain (un-wrapped) model."""
    return e.key.startswith((".", PEFT_PREFIX)) or e.role not in (Role.FULL, Role.BIAS, Role.BASE) or ".modules_to_save." in e.key


def _strict_false(ckpt: Checkpoint, base: BaseFacts | None) -> list[Finding]:
    """Simulate ``plain_base.load_state_dict(dump, strict=False)`` on the dump's raw keys (dot keys included)."""
    dup = next((f for f in ckpt.findings if f.code == "duplicate-key"), None)
    raw = [e.key for e in ckpt.entries] + list(dup.keys if dup else ())
    if not raw:
        return []
    if base is not None:
        plain = base.state_dict_keys()
        matched = [k for k in raw if k in plain]
        how = "into the plain base"
    else:
        matched = [e.key for e in ckpt.entries if not _never_plain(e)]
        how = "into any plain model (PEFT-wrapped names)"
    if matched:
        return []
    return [
        _finding(
            "strict-false-noop",
            f"load_state_dict(strict=False) {how} would load 0 of {len(raw)} keys and raise nothing "
            f"(e.g. {raw[0]!r}); load it into the PeftModel, or convert it with qvl-ckpt convert",
            raw,
        )
    ]


def _resize(ckpt: Checkpoint, base: BaseFacts) -> tuple[VocabResize | None, list[tuple[str, str]]]:
    """The adapter's resized vocabulary (shared with merge planning), token ids resolved as merge does."""
    a = ckpt.adapter
    emb_rows = next((e.source_module for e in ckpt.entries if e.role is Role.TOKEN_ROWS and e.target == base.embed), None)

    def ids(e: Entry) -> list[int] | None:
        if a is None:
            return None
        got = a.token_indices(e.source_module)
        if got is None and base.tied and e.target == base.head and emb_rows is not None:
            got = a.token_indices(emb_rows)
        return got

    return resolve_vocab(ckpt.entries, base.embed, base.head, base.shape(base.embed) if base.embed else None, tied=base.tied, token_indices=ids)


def _vocab_finding(src: Checkpoint, keys, base_rows: int, rows: int, what: str) -> Finding:
    _, problem = tokenizer_fit(src.path, base_rows, rows)
    how = "grown" if rows > base_rows else "shrunk"
    tok = f"; {problem}" if problem else "; SRC ships a tokenizer whose ids fit the new rows"
    return _finding("resized-vocab", f"vocabulary {how} from {base_rows} to {rows} rows ({what}){tok}", keys)


def _vs_base(ckpt: Checkpoint, base: BaseFacts, pairs: dict[str, LoraPair]) -> list[Finding]:
    unmatched: list[str] = []
    unmatched_targets: list[str] = []
    mismatch: list[tuple[str, str]] = []  # (key, why)
    layout = base.ckpt.layout
    emb_modules = {p.module for p in pairs.values() if p.embedding}
    resize, vocab_problems = _resize(ckpt, base)
    mismatch += vocab_problems
    if resize is None and not vocab_problems and base.embed and base.shape(base.embed):
        lost = unsaved_resize(ckpt.path, base.shape(base.embed)[0], SAVE_FIX)
        if lost:
            mismatch.append((str(ckpt.path), lost))
    reported = {k for k, _ in vocab_problems}
    resized_shape = (resize.rows, base.shape(base.embed)[1]) if resize is not None else None
    for e in ckpt.entries:
        if e.key in reported:
            continue
        want = base.shape(e.target)
        if resized_shape is not None and e.target in (base.embed, base.head):
            want = resized_shape
        if want is None:
            unmatched.append(e.key)
            unmatched_targets.append(e.target)
            continue
        why = _shape_problem(e, want, pairs.get(e.target) if e.role in (Role.LORA_A, Role.LORA_B, Role.EMB_A, Role.EMB_B) else None,
                             e.module in emb_modules, ckpt, layout)
        if why:
            mismatch.append((e.key, why))
    # a LoRA pair whose factors disagree on the rank
    for p in pairs.values():
        if p.a is not None and p.b is not None and len(p.b.shape) > 1 and p.a.shape and p.a.shape[0] != p.b.shape[1]:
            mismatch.append((p.b.key, f"lora_B rank {p.b.shape[1]} != lora_A rank {p.a.shape[0]}"))
    out = []
    if resize is not None:
        out.append(_vocab_finding(ckpt, resize.keys, resize.base_rows, resize.rows,
                                  "embedding and lm_head saved by the adapter; a merge takes its rows and sets vocab_size"))
    if mismatch:
        keys = [k for k, _ in mismatch]
        out.append(
            _finding(
                "shape-mismatch",
                f"{len(mismatch)} tensors do not fit the base ({base.ckpt.path.name}): "
                + "; ".join(f"{k}: {why}" for k, why in mismatch[:3])
                + (f"; (+{len(mismatch) - 3} more)" if len(mismatch) > 3 else ""),
                keys,
            )
        )
    if unmatched:
        out.append(
            _finding(
                "unmatched-key",
                f"{len(unmatched)} adapter tensors resolve to no tensor of the base (e.g. {unmatched_targets[0]!r}): "
                "a load would silently skip them (adapter of another model, or a typo in the names?)",
                unmatched,
            )
        )
    return out


def _shape_problem(e: Entry, want: tuple[int, ...], pair: LoraPair | None, emb: bool, ckpt: Checkpoint, layout) -> str | None:
    """Why entry ``e`` cannot act on a base tensor of shape ``want``, or None."""
    role = e.role
    if role in (Role.FULL, Role.BIAS):
        if e.shape == want:
            return None
        return f"shape {list(e.shape)}, base {list(want)}"
    if pair is not None and pair.a is not None and pair.b is not None and pair.a.param_wrapper:
        return param_shape_problem(pair.a.shape, pair.b.shape, want)
    if pair is not None:
        eff = pair.effect_shape
        if eff is None:
            return None  # incomplete pair; the other factor is reported where it exists
        if tuple(eff) == tuple(want) or (len(want) == 2 and tuple(eff) == tuple(want)[::-1] and not pair.embedding):
            return None
        return f"LoRA delta {list(eff)} for a base tensor {list(want)}"
    if role is Role.LORA_BIAS:
        return None if e.shape == want else f"lora bias {list(e.shape)}, base bias {list(want)}"
    if role is Role.MAGNITUDE:
        n = e.numel
        ok = (n == want[1]) if emb and len(want) == 2 else (n == want[0] or (len(want) == 2 and n == want[1]))
        return None if ok else f"DoRA magnitude of {n} values for a base tensor {list(want)}"
    if role is Role.TOKEN_ROWS:
        if len(e.shape) != 2 or len(want) != 2 or e.shape[1] != want[1]:
            return f"token rows {list(e.shape)} for a base tensor {list(want)}"
        ids = ckpt.adapter.token_indices(e.source_module) if ckpt.adapter else None
        if ids is not None:
            if len(ids) != e.shape[0]:
                return f"{e.shape[0]} token rows but {len(ids)} trainable_token_indices"
            if ids and max(ids) >= want[0]:
                return f"token index {max(ids)} outside the base vocabulary of {want[0]}"
        return None
    return None


def _merged_vs_base(ckpt: Checkpoint, base: BaseFacts) -> list[Finding]:
    own = {e.target: e for e in ckpt.entries}
    mismatch = []
    for t, e in own.items():
        want = base.shape(t)
        if want is not None and want != e.shape:
            why = _shape_problem(e if e.role is not Role.BASE else _as_full(e), want, None, False, ckpt, base.ckpt.layout)
            mismatch.append((e.key, why))
    extra = sorted(e.key for t, e in own.items() if base.shape(t) is None)
    missing = sorted(t for t, e in base.entries.items() if t not in own and not (t == base.head and base.head_missing))
    head = base.head
    if head and head in missing and base.embed in own:
        missing.remove(head)
    out = []
    rows = _merged_rows(mismatch, own, base)
    if rows is not None:
        out.append(_vocab_finding(ckpt, [k for k, _ in mismatch], base.shape(base.embed)[0], rows, "embedding and lm_head of the merged model"))
        mismatch = []
    if mismatch:
        out.append(
            _finding(
                "shape-mismatch",
                f"{len(mismatch)} tensors differ in shape from the base: " + "; ".join(f"{k}: {w}" for k, w in mismatch[:3]),
                [k for k, _ in mismatch],
            )
        )
    if extra or missing:
        parts = []
        if extra:
            parts.append(f"{len(extra)} tensors the base does not have ({_few(extra)})")
        if missing:
            parts.append(f"{len(missing)} base tensors missing ({_few(missing)})")
        out.append(_finding("unmatched-key", "merged model vs base: " + "; ".join(parts), extra + missing))
    return out


def _merged_rows(mismatch: list[tuple[str, str]], own: dict[str, Entry], base: BaseFacts) -> int | None:
    """A merged model whose only shape changes are the embedding/head rows (both, or a tied embedding): the rows."""
    if not mismatch or base.embed not in own:
        return None
    changed = {e.target for e in own.values() if e.key in {k for k, _ in mismatch}}
    emb = own[base.embed]
    want = base.shape(base.embed)
    if not changed <= {base.embed, base.head} or want is None or len(emb.shape) != 2 or emb.shape[1] != want[1]:
        return None
    head = own.get(base.head)
    if head is None and not base.tied:
        return None
    return emb.shape[0] if head is None or head.shape == emb.shape else None


def _as_full(e: Entry) -> Entry:
    return replace(e, role=Role.FULL)


def _tied(ckpt: Checkpoint, tied: bool | None, base: BaseFacts | None, pairs: dict[str, LoraPair]) -> list[Finding]:
    """Training or merging on a tied embedding/head: the trained model and a naive merge disagree."""
    layout = (base.ckpt.layout if base is not None else ckpt.layout)
    emb, head = layout.embedding, layout.head
    if not emb or not head or not ckpt.is_adapter or not tied:
        return []
    roles_on = {emb: set(), head: set()}
    keys: list[str] = []
    for e in ckpt.entries:
        if e.module in roles_on and e.role is not Role.TOKEN_ROWS:
            roles_on[e.module].add("LoRA" if e.role not in (Role.FULL, Role.BIAS) else "modules_to_save")
            keys.append(e.key)
    touched = [m for m in (emb, head) if roles_on[m]]
    if not touched:
        return []
    a = ckpt.adapter
    ensure = bool(a and a.ensure_weight_tying)
    lora_on_tied = any("LoRA" in roles_on[m] for m in touched)
    if ensure and not lora_on_tied:
        return []  # trained tied on purpose; the merge keeps one shared matrix
    what = ", ".join(f"{'/'.join(sorted(roles_on[m]))} on {m}" for m in touched)
    if len(touched) == 1:
        other = head if touched[0] == emb else emb
        msg = (f"{what} of a tied embedding/head pair, {other} untouched: the trained model used two different "
               "matrices; a merge must untie (tie_word_embeddings=false) and write both")
    else:
        msg = f"{what} of a tied embedding/head pair: a merge must untie (tie_word_embeddings=false) and write both"
    if lora_on_tied:
        msg += "; PEFT's merge_and_unload puts the LoRA delta into the shared matrix (lm_head changes too" + (", added twice with ensure_weight_tying)" if ensure else ")")
    return [_finding("tied-weights", msg, keys)]
