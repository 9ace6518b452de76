"""Serving-engine knowledge as data: what each engine refuses, silently ignores or limits in an adapter.

One JSON file per engine (``vllm.json``), with the engine versions the rules were checked on against the
engine itself (tests/external). :mod:`qvl_plugin.ckpt.serve_audit` evaluates a checkpoint against them;
``qvl-ckpt merge --serve ENGINE`` bakes what the engine cannot serve into a new base.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

from ..errors import UsageError

__all__ = ["Rule", "EngineRules", "engines", "get_rules", "VERDICTS"]

VERDICTS = ("refused", "ignored", "limit")
_PARTIAL = ("bake", "bake_module", "keep")


@dataclass(frozen=True)
class Rule:
    """One thing an engine does with one kind of adapter content."""

    id: str
    verdict: str                  # refused | ignored | limit
    what: str
    roles: tuple[str, ...]        # entry roles (qvl_plugin.ckpt.keys.Role values) the rule is about
    module: re.Pattern | None     # the canonical module must match (search)
    not_module: re.Pattern | None
    not_lora_module: bool         # skip full tensors of LoRA modules (saved base layers)
    rank_above: int | None
    config: dict[str, Any] | None  # an adapter_config.json condition that fires the rule on its own
    engine_says: str
    advice: str
    partial: str                  # bake (the matched tensors) | bake_module (every tensor of the module) | keep
    served_with: str | None = None  # an engine option under which the engine serves it after all (measured)


@dataclass(frozen=True)
class EngineRules:
    engine: str
    name: str
    checked_on: dict[str, Any]
    rules: tuple[Rule, ...]
    lora_rank: dict[str, Any] = field(default_factory=dict)

    def rule(self, rule_id: str) -> Rule:
        return next(r for r in self.rules if r.id == rule_id)

    @property
    def checked(self) -> str:
        c = self.checked_on
        return f"{c.get('package', self.engine)} {', '.join(c.get('versions', []))}"


def _rule(d: dict) -> Rule:
    m = d.get("match", {})
    if d["verdict"] not in VERDICTS or d.get("partial", "keep") not in _PARTIAL:
        raise ValueError(f"serving rule {d['id']!r}: bad verdict or partial")
    return Rule(
        id=d["id"], verdict=d["verdict"], what=d["what"], roles=tuple(m.get("roles", ())),
        module=re.compile(m["module"]) if m.get("module") else None,
        not_module=re.compile(m["not_module"]) if m.get("not_module") else None,
        not_lora_module=bool(m.get("not_lora_module")), rank_above=m.get("rank_above"), config=d.get("config"),
        engine_says=d["engine_says"], advice=d["advice"], partial=d.get("partial", "keep"),
        served_with=d.get("served_with"),
    )


def engines() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(__name__).iterdir() if p.name.endswith(".json"))


@cache
def get_rules(engine: str) -> EngineRules:
    """The rules of ``engine`` (``vllm``); a UsageError names the known engines otherwise."""
    if engine not in engines():
        raise UsageError(f"unknown serving engine {engine!r} (known: {', '.join(engines())})")
    d = json.loads(resources.files(__name__).joinpath(f"{engine}.json").read_text(encoding="utf-8"))
    return EngineRules(d["engine"], d["name"], d["checked_on"], tuple(_rule(r) for r in d["rules"]), d.get("lora_rank", {}))
