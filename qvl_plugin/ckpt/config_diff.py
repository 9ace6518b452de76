"""The config.json fields that change what a model computes, compared between two full models.

Equal tensors do not make equal models: ``tie_word_embeddings`` decides whether a trained lm_head is used,
``vocab_size`` what the embedding is resized to, ``model_type``/``architectures`` which class loads the
file, ``dtype`` what it is cast to. Nested configs (``text_config``) are compared too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

__all__ = ["ConfigDiff", "BEHAVIOUR_FIELDS", "config_changes"]

#: (field, keys that hold it; the first present wins): top level and the text sub-config.
BEHAVIOUR_FIELDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("tie_word_embeddings", ("tie_word_embeddings",)),
    ("text_config.tie_word_embeddings", ("text_config.tie_word_embeddings",)),
    ("vocab_size", ("vocab_size",)),
    ("text_config.vocab_size", ("text_config.vocab_size",)),
    ("model_type", ("model_type",)),
    ("architectures", ("architectures",)),
    ("dtype", ("dtype", "torch_dtype")),  # transformers >= 5 writes dtype, 4.x torch_dtype
    ("text_config.dtype", ("text_config.dtype", "text_config.torch_dtype")),
)
_MISSING = object()


@dataclass(frozen=True)
class ConfigDiff:
    field: str
    a: Any
    b: Any

    def to_dict(self) -> dict:
        return {"field": self.field, "a": self.a, "b": self.b}


def _get(cfg: Mapping, dotted: str) -> Any:
    cur: Any = cfg
    for part in dotted.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return _MISSING
        cur = cur[part]
    return cur


def _value(cfg: Mapping, keys: tuple[str, ...]) -> Any:
    for k in keys:
        v = _get(cfg, k)
        if v is not _MISSING:
            return v
    return None


def config_changes(a: Mapping | None, b: Mapping | None) -> list[ConfigDiff]:
    """Differences in :data:`BEHAVIOUR_FIELDS` (None where a side does not set the field)."""
    if a is None or b is None:
        return []
    out = []
    for name, keys in BEHAVIOUR_FIELDS:
        va, vb = _value(a, keys), _value(b, keys)
        if va != vb:
            out.append(ConfigDiff(name, va, vb))
    return out
