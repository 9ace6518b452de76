"""The PEFT key grammar, in one place: in-memory names (dumps) and saved names (adapters) alike.

``base_model.model.<module>.lora_A[.<adapter>].weight`` and friends -> (module, param, role). The table
mirrors PEFT_FORMAT §1.2; order matters (most specific first).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

__all__ = ["Role", "ParsedKey", "parse_key", "PEFT_PREFIX", "LORA_ROLES", "REPLACE_ROLES", "lora_suffix"]

PEFT_PREFIX = "base_model.model."


class Role(str, Enum):
    BASE = "base"
    LORA_A = "lora_A"
    LORA_B = "lora_B"
    LORA_BIAS = "lora_bias"
    EMB_A = "lora_embedding_A"
    EMB_B = "lora_embedding_B"
    MAGNITUDE = "magnitude"
    FULL = "full"
    BIAS = "bias"
    TOKEN_ROWS = "token_rows"

    def __str__(self) -> str:
        return self.value


LORA_ROLES = frozenset({Role.LORA_A, Role.LORA_B, Role.LORA_BIAS, Role.EMB_A, Role.EMB_B, Role.MAGNITUDE})
REPLACE_ROLES = frozenset({Role.FULL, Role.BIAS})

_A = r"(?:\.(?P<a>[^.]+))?"
_GRAMMAR: list[tuple[re.Pattern, Role, str | None]] = [
    (re.compile(rf"^(?P<m>.+)\.lora_A{_A}\.weight$"), Role.LORA_A, "weight"),
    (re.compile(rf"^(?P<m>.+)\.lora_B{_A}\.weight$"), Role.LORA_B, "weight"),
    (re.compile(rf"^(?P<m>.+)\.lora_B{_A}\.bias$"), Role.LORA_BIAS, "bias"),
    (re.compile(rf"^(?P<m>.+)\.lora_embedding_A{_A}$"), Role.EMB_A, "weight"),
    (re.compile(rf"^(?P<m>.+)\.lora_embedding_B{_A}$"), Role.EMB_B, "weight"),
    (re.compile(r"^(?P<m>.+)\.lora_magnitude_vector(?:\.(?P<a>(?!weight$)[^.]+))?(?:\.weight)?$"), Role.MAGNITUDE, "weight"),
    (re.compile(rf"^(?P<m>.+?)(?:\.token_adapter)?\.trainable_tokens_delta{_A}$"), Role.TOKEN_ROWS, "weight"),
    (re.compile(r"^(?P<m>.+)\.modules_to_save\.(?P<a>[^.]+)\.(?P<p>.+)$"), Role.FULL, None),
    # PEFT's saved base layer of a LoRA-targeted (or trainable-token wrapped) embedding: the matrix itself
    (re.compile(r"^(?P<m>.+?)(?:\.token_adapter)?\.base_layer\.(?P<p>[^.]+)$"), Role.FULL, None),
]
_IGNORED = re.compile(r"\.(original_module|modules_to_save)(\.|$)|\.trainable_tokens_original(\.|$)")


@dataclass(frozen=True)
class ParsedKey:
    module: str         # module path as written (prefix and adapter name removed)
    param: str          # the base parameter it belongs to
    role: Role
    adapter: str | None  # adapter name when the key is an in-memory name
    from_mts: bool      # came from ``modules_to_save.<adapter>.`` (an in-memory name)


def parse_key(key: str, *, default_role: Role = Role.FULL) -> ParsedKey | None:
    """Classify one key (without ``base_model.model.``); ``None`` for keys to ignore (frozen copies).

    Keys with no PEFT suffix get ``default_role``: FULL in an adapter or dump (a replacement of the base
    tensor), BASE in a merged model. A trailing ``bias`` there is reported as BIAS.
    """
    for pattern, role, param in _GRAMMAR:
        m = pattern.match(key)
        if m:
            groups = m.groupdict()
            adapter = groups.get("a")
            if m.re.pattern.startswith(r"^(?P<m>.+)\.modules_to_save"):
                module, _, p = f"{groups['m']}.{groups['p']}".rpartition(".")
                return ParsedKey(module, p, Role.FULL, adapter, True)
            if param is None:
                p = groups["p"]
                return ParsedKey(groups["m"], p, Role.BIAS if p == "bias" else Role.FULL, adapter, False)
            return ParsedKey(groups["m"], param, role, adapter, False)
    if _IGNORED.search(key):
        return None
    module, _, param = key.rpartition(".")
    if not module:
        module, param = "", key
    role = default_role
    if default_role is Role.FULL and param == "bias":
        role = Role.BIAS
    return ParsedKey(module, param, role, None, False)


_LORA_SUFFIX: dict[Role, tuple[str, str | None]] = {
    Role.LORA_A: ("lora_A", "weight"),
    Role.LORA_B: ("lora_B", "weight"),
    Role.LORA_BIAS: ("lora_B", "bias"),
    Role.EMB_A: ("lora_embedding_A", None),
    Role.EMB_B: ("lora_embedding_B", None),
    Role.MAGNITUDE: ("lora_magnitude_vector", None),
}


def lora_suffix(role: Role, adapter: str | None = None) -> str:
    """The key tail of a LoRA tensor: saved form (``lora_A.weight``), or in-memory form when ``adapter``
    is given (``lora_A.default.weight``; DoRA ``lora_magnitude_vector.default.weight``)."""
    name, param = _LORA_SUFFIX[role]
    if adapter is None:
        return f"{name}.{param}" if param else name
    if role is Role.MAGNITUDE:
        return f"{name}.{adapter}.weight"
    return f"{name}.{adapter}.{param}" if param else f"{name}.{adapter}"
