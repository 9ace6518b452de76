"""Resized vocabularies (new tokens): does an adapter carry one consistent new row count for the embedding and
the head, and which saved matrix holds each side's new rows?

After ``tokenizer.add_tokens`` + ``model.resize_token_embeddings`` the trained model's embedding and head have
``N`` rows instead of the base's ``V``. A merge onto the original base can only reproduce that model when the
adapter saved every new row: a modules_to_save copy, PEFT's saved ``base_layer`` of a LoRA-targeted embedding
(``save_embedding_layers=True``), or a trainable-token wrapper's saved base layer. Merge planning and audit
both decide here, so they agree on what is a resize and what is a wrong base.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

from .keys import Role
from .view import Entry

__all__ = ["VocabResize", "resolve_vocab", "SAVE_FIX"]

SAVE_FIX = "save the adapter with save_embedding_layers=True (peft_model.save_pretrained(dir, save_embedding_layers=True))"


@dataclass(frozen=True)
class VocabResize:
    """The adapter's embedding/head row count ``rows`` replaces the base's ``base_rows``.

    ``embed``/``head``: the saved matrix holding that side's rows; None on a tied base when that side
    follows the other's saved base layer (PEFT tied them in memory).
    """

    base_rows: int
    rows: int
    embed: Entry | None
    head: Entry | None
    keys: tuple[str, ...]

    @property
    def grown(self) -> bool:
        return self.rows > self.base_rows


@dataclass
class _Side:
    name: str
    module: str                              # the name a user writes in modules_to_save
    full: Entry | None = None
    lora: tuple[Entry, int] | None = None    # a LoRA factor and the row count it implies
    tokens: tuple[Entry, int] | None = None  # trainable-token rows and their largest index
    wrapped: bool = False                    # a LoRA / token wrapper: the saved full matrix is its base layer

    def keys(self) -> list[str]:
        return [x.key for x in (self.full, self.lora and self.lora[0], self.tokens and self.tokens[0]) if x is not None]


def _sides(entries: Iterable[Entry], emb_t: str, head_t: str, hidden: int,
           token_indices: Callable[[Entry], list[int] | None]) -> tuple[_Side, _Side]:
    emb = _Side("the embedding", emb_t.rpartition(".")[0].rpartition(".")[2] or emb_t)
    head = _Side("lm_head", head_t.rpartition(".")[0].rpartition(".")[2] or head_t)
    for e in entries:
        side = emb if e.target == emb_t else head if e.target == head_t else None
        if side is None:
            continue
        if e.role is Role.FULL and len(e.shape) == 2 and e.shape[1] == hidden:
            side.full = e
        elif e.role is Role.EMB_A and len(e.shape) == 2:
            side.lora, side.wrapped = (e, e.shape[1]), True
        elif e.role is Role.LORA_B and len(e.shape) == 2 and side is head:
            side.lora, side.wrapped = (e, e.shape[0]), True
        elif e.role in (Role.LORA_A, Role.EMB_B, Role.MAGNITUDE):
            side.wrapped = True
        elif e.role is Role.TOKEN_ROWS:
            side.wrapped = True
            ids = token_indices(e)
            if ids:
                side.tokens = (e, max(ids))
    return emb, head


def resolve_vocab(
    entries: Iterable[Entry],
    emb_t: str | None,
    head_t: str | None,
    base_shape: tuple[int, ...] | None,
    *,
    tied: bool,
    token_indices: Callable[[Entry], list[int] | None],
) -> tuple[VocabResize | None, list[tuple[str, str]]]:
    """(the resize, or None when the adapter keeps the base's rows; problems as (key, why)).

    ``base_shape`` is the base embedding's ``(V, hidden)``. Only 2-D tensors of the base's hidden size count
    here; any other shape disagreement stays a plain shape mismatch for the caller to report.
    """
    if emb_t is None or head_t is None or base_shape is None or len(base_shape) != 2:
        return None, []
    v, hidden = base_shape
    emb, head = _sides(list(entries), emb_t, head_t, hidden, token_indices)

    def says_resized(s: _Side) -> bool:
        return ((s.full is not None and s.full.shape[0] != v) or (s.lora is not None and s.lora[1] != v)
                or (s.tokens is not None and s.tokens[1] >= v))

    if not (says_resized(emb) or says_resized(head)):
        return None, []
    problems: list[tuple[str, str]] = []

    def rows_of(s: _Side) -> int | None:
        """The row count this side carries, reporting what contradicts it or was not saved."""
        if s.full is not None:
            n = s.full.shape[0]
            if s.lora is not None and s.lora[1] != n:
                problems.append((s.lora[0].key, f"LoRA for {s.lora[1]} rows on a saved matrix of {n} rows"))
            if s.tokens is not None and s.tokens[1] >= n:
                problems.append((s.tokens[0].key, f"token index {s.tokens[1]} outside the saved {n} rows"))
            return n
        if s.lora is not None and s.lora[1] != v:
            problems.append((s.lora[0].key, f"LoRA on a resized {s.name} ({s.lora[1]} rows, the base has {v}) but its "
                             f"resized base rows were not saved: {SAVE_FIX}"))
            return s.lora[1]
        if s.tokens is not None and s.tokens[1] >= v:
            problems.append((s.tokens[0].key, f"trainable token index {s.tokens[1]} beyond the base's {v} rows, but the "
                             f"resized {s.name} was not saved: {SAVE_FIX}"))
            return s.tokens[1] + 1
        return None

    n_emb, n_head = rows_of(emb), rows_of(head)
    if problems:
        return None, problems
    if n_emb is not None and n_head is not None:
        if n_emb != n_head:
            keys = emb.keys() + head.keys()
            return None, [(k, f"the embedding has {n_emb} rows but lm_head {n_head}: they must be resized together") for k in keys]
        return VocabResize(v, n_emb, emb.full, head.full, tuple(emb.keys() + head.keys())), []
    done, other = (emb, head) if n_emb is not None else (head, emb)
    n = n_emb if n_emb is not None else n_head
    if other.lora is not None or other.tokens is not None or other.full is not None:
        why = f"{done.name} has {n} rows but {other.name} is trained on the base's {v}: they must be resized together"
        return None, [(k, why) for k in done.keys() + other.keys()]
    if tied and done.wrapped:
        # PEFT tied the other side to this side's (saved) base layer: it has the same new rows
        return VocabResize(v, n, emb.full, head.full, tuple(done.keys())), []
    if tied:
        why = (f"{done.name} resized to {n} rows as modules_to_save of a tied pair, {other.name} not saved: the trained "
               f"{other.name} kept the resized original's new rows, which the adapter lacks; add {other.module} "
               "to modules_to_save (or train with ensure_weight_tying=True)")
    else:
        why = (f"only {done.name} is resized ({n} rows, the base has {v}); the untied {other.name} was resized too but not "
               f"saved: add {other.module} to modules_to_save (or target it with LoRA and {SAVE_FIX})")
    return None, [(k, why) for k in done.keys()]
