"""adapter_config.json -> the few settings a merge, diff or audit needs, validated.

PEFT stays the authority on semantics: pattern lookups use PEFT's own ``get_pattern_key`` so rank/alpha
patterns resolve exactly as they did in training.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..errors import AdapterConfigError, CheckpointError

__all__ = ["AdapterSettings", "load_adapter_config", "UNSAFE_INITS"]

# Inits that rewrite the base weight into a residual: the adapter is only valid on that residual.
UNSAFE_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
_SUPPORTED_TYPES = ("LORA", "TRAINABLE_TOKENS")


# A quantified group that itself contains a quantifier ("(a*)*b") can backtrack exponentially.
_NESTED_QUANTIFIER = re.compile(r"\([^)]*[*+}][^)]*\)\s*[*+{]")


def _check_pattern(key: str, what: str) -> None:
    """Pattern keys are regexes run by PEFT's ``get_pattern_key``: refuse broken or catastrophic ones."""
    if len(key) > 1000 or _NESTED_QUANTIFIER.search(key):
        raise AdapterConfigError(f"{what} {key[:80]!r} is refused (too long or nested quantifiers)")
    try:
        re.compile(rf"(.*\.)?({key})$")
    except re.error as e:
        raise AdapterConfigError(f"{what} {key[:80]!r} is not a valid regex ({e})") from None


def _pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    if not patterns:
        return None
    from peft.utils.other import get_pattern_key  # only when patterns exist: importing peft costs seconds

    key = get_pattern_key(list(patterns), module)
    return key if key in patterns else None


@dataclass
class AdapterSettings:
    """The LoRA settings that change what a tensor means. ``lora_alpha=None`` means unknown (a bare dump)."""

    peft_type: str = "LORA"
    r: int | None = None
    lora_alpha: float | None = None
    use_rslora: bool = False
    use_dora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    target_modules: list[str] | str | None = None
    modules_to_save: list[str] = field(default_factory=list)
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    bias: str = "none"
    lora_bias: bool = False
    fan_in_fan_out: bool = False
    init_lora_weights: bool | str = True
    base_model_name_or_path: str | None = None
    ensure_weight_tying: bool = False
    layer_replication: Any = None
    raw: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "adapter_config.json") -> "AdapterSettings":
        if not isinstance(d, Mapping):
            raise AdapterConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        peft_type = d.get("peft_type", "LORA")
        if not isinstance(peft_type, str) or peft_type.upper() not in _SUPPORTED_TYPES:
            raise AdapterConfigError(
                f"{source}: peft_type {peft_type!r} is not supported (only {', '.join(_SUPPORTED_TYPES)})"
            )

        def typed(name: str, types: tuple, default: Any = None) -> Any:
            value = d.get(name, default)
            if value is None:
                return default
            if isinstance(value, bool) and bool not in types:
                raise AdapterConfigError(f"{source}: {name} must be {'/'.join(t.__name__ for t in types)}, got {value!r}")
            if not isinstance(value, types):
                raise AdapterConfigError(f"{source}: {name} must be {'/'.join(t.__name__ for t in types)}, got {value!r}")
            return value

        r = typed("r", (int,))
        if r is not None and r <= 0:
            raise AdapterConfigError(f"{source}: r must be positive, got {r}")
        alpha = typed("lora_alpha", (int, float))
        if alpha is not None and not math.isfinite(alpha):
            raise AdapterConfigError(f"{source}: lora_alpha must be finite, got {alpha}")
        rank_pattern = typed("rank_pattern", (dict,), {})
        alpha_pattern = typed("alpha_pattern", (dict,), {})
        for name, pat in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
            for k, v in pat.items():
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                    raise AdapterConfigError(f"{source}: {name}[{k!r}] must be a positive number, got {v!r}")
                _check_pattern(k, f"{source}: {name} key")
        mts = typed("modules_to_save", (list,), []) or []
        if not all(isinstance(m, str) for m in mts):
            raise AdapterConfigError(f"{source}: modules_to_save must be a list of strings")
        tti = d.get("trainable_token_indices", d.get("token_indices") if peft_type.upper() == "TRAINABLE_TOKENS" else None)
        if tti is not None:
            ok_list = lambda v: isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v)
            if not (ok_list(tti) or (isinstance(tti, dict) and all(isinstance(k, str) and ok_list(v) for k, v in tti.items()))):
                raise AdapterConfigError(f"{source}: trainable_token_indices must be a list of ids or {{module: [ids]}}")
        targets = d.get("target_modules")
        if targets is not None and not (isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
            raise AdapterConfigError(f"{source}: target_modules must be a string or a list of strings")
        bias = typed("bias", (str,), "none")
        if bias not in ("none", "all", "lora_only"):
            raise AdapterConfigError(f"{source}: bias must be none/all/lora_only, got {bias!r}")
        init = d.get("init_lora_weights", True)
        if not isinstance(init, (bool, str)):
            raise AdapterConfigError(f"{source}: init_lora_weights must be a bool or a string")
        return cls(
            peft_type=peft_type.upper(),
            r=r,
            lora_alpha=float(alpha) if alpha is not None else None,
            use_rslora=bool(typed("use_rslora", (bool,), False)),
            use_dora=bool(typed("use_dora", (bool,), False)),
            rank_pattern=dict(rank_pattern),
            alpha_pattern=dict(alpha_pattern),
            target_modules=targets,
            modules_to_save=list(mts),
            trainable_token_indices=tti,
            bias=bias,
            lora_bias=bool(typed("lora_bias", (bool,), False)),
            fan_in_fan_out=bool(typed("fan_in_fan_out", (bool,), False)),
            init_lora_weights=init,
            base_model_name_or_path=typed("base_model_name_or_path", (str,)),
            ensure_weight_tying=bool(typed("ensure_weight_tying", (bool,), False)),
            layer_replication=d.get("layer_replication"),
            raw=dict(d),
        )

    @property
    def unsafe_init(self) -> str | None:
        """The init name when it mutated the base weight (PiSSA, OLoRA, ...), else None."""
        init = self.init_lora_weights
        if isinstance(init, str) and init.lower().startswith(UNSAFE_INITS):
            return init
        return None

    def alpha_for(self, source_module: str) -> float | None:
        key = _pattern_key(self.alpha_pattern, source_module)
        return float(self.alpha_pattern[key]) if key is not None else self.lora_alpha

    def scaling(self, source_module: str, rank: int) -> float:
        """LoRA scaling for one module, as PEFT computes it (alpha_pattern, rsLoRA)."""
        if rank <= 0:
            raise AdapterConfigError(f"{source_module}: LoRA rank must be positive, got {rank}")
        alpha = self.alpha_for(source_module)
        if alpha is None:
            raise AdapterConfigError("no lora_alpha known: pass --adapter-config or --lora-alpha")
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def token_indices(self, source_module: str, embedding_names: tuple[str, ...] = ("embed_tokens", "wte")) -> list[int] | None:
        """Row ids for a module's trainable-token delta (config order = delta row order)."""
        tti = self.trainable_token_indices
        if tti is None:
            return None
        if isinstance(tti, list):
            if self.peft_type == "TRAINABLE_TOKENS":  # token_indices apply to every targeted module (embed and tied head)
                return list(tti)
            leaf = source_module.rsplit(".", 1)[-1]
            return list(tti) if leaf in embedding_names else None
        for name, ids in tti.items():
            if source_module == name or source_module.endswith("." + name):
                return list(ids)
        return None

    def to_dict(self) -> dict:
        return dict(self.raw)


def load_adapter_config(path: str | Path) -> AdapterSettings:
    """Read an adapter_config.json safely (regular file, size cap) and validate it."""
    from .safety import read_json

    path = Path(path)
    try:
        data = read_json(path)
    except CheckpointError as e:
        raise AdapterConfigError(str(e)) from None
    return AdapterSettings.from_dict(data, source=path.name)
