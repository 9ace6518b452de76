"""Evaluate an opened adapter against a serving engine's rules (``qvl_plugin/serving/<engine>.json``).

``audit --serve vllm`` turns every rule that fires into a finding (``vllm-<rule id>``: refused and
silently ignored parts are errors, limits warnings), with what the engine itself says and what to do.
Without ``--serve`` the refusals and ignored parts are summed up in one ``vllm-incompatible`` info.
The same hits tell ``merge --serve`` which tensors to bake into the new base (:func:`baked_entries`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..serving import EngineRules, Rule, get_rules
from .keys import Role
from .view import Checkpoint, Entry, Finding

__all__ = ["Hit", "evaluate", "serve_findings", "serving_audit", "baked_entries", "lora_rank"]

_LORA_FACTORS = (Role.LORA_A, Role.LORA_B, Role.EMB_A, Role.EMB_B)
_MAX_KEYS = 50


@dataclass
class Hit:
    """One rule that fires on a checkpoint: the entries it matched (none for a config-only hit)."""

    rule: Rule
    entries: list[Entry] = field(default_factory=list)
    config_only: bool = False
    detail: dict = field(default_factory=dict)

    @property
    def modules(self) -> list[str]:
        return sorted({e.module for e in self.entries})


def _few(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def _config_fires(cond: dict | None, raw: dict) -> bool:
    if not cond or cond["field"] not in raw:
        return False
    v = raw[cond["field"]]
    if "present_except" in cond:
        return isinstance(v, (list, tuple)) and any(m not in cond["present_except"] for m in v)
    if "truthy" in cond:
        return bool(v) is bool(cond["truthy"])
    if "not_in" in cond:
        return v not in cond["not_in"]
    return False


def lora_rank(ckpt: Checkpoint) -> int:
    """The largest rank the engine sees: the tensors' and, as vLLM reads it, the config's r and rank_pattern."""
    ranks = [e.shape[0] for e in ckpt.entries if e.role in (Role.LORA_A, Role.EMB_A) and e.shape]
    a = ckpt.adapter
    if a is not None and ranks:
        raw = a.raw or {}
        ranks += [v for v in [raw.get("r"), *(raw.get("rank_pattern") or {}).values()] if isinstance(v, int)]
    return max(ranks, default=0)


def _matches(rule: Rule, e: Entry, lora_modules: set[str]) -> bool:
    if rule.roles and e.role.value not in rule.roles:
        return False
    if rule.module is not None and not rule.module.search(e.module):
        return False
    if rule.not_module is not None and rule.not_module.search(e.module):
        return False
    if rule.not_lora_module and e.module in lora_modules:
        return False
    return True


def evaluate(ckpt: Checkpoint, engine: str = "vllm") -> list[Hit]:
    """Every rule of ``engine`` that fires on the adapter ``ckpt`` (a full model fires none)."""
    rules = get_rules(engine)
    if not ckpt.is_adapter:
        return []
    lora_modules = {e.module for e in ckpt.entries if e.role in _LORA_FACTORS}
    raw = (ckpt.adapter.raw or {}) if ckpt.adapter is not None else {}
    hits = []
    for rule in rules.rules:
        if rule.rank_above is not None:
            rank = lora_rank(ckpt)
            if rank > rule.rank_above:
                big = [e for e in ckpt.entries if e.role is Role.LORA_A and e.shape and e.shape[0] > rule.rank_above]
                hits.append(Hit(rule, big, config_only=not big, detail={"rank": rank, "need": _need(rules, rank)}))
            continue
        matched = [e for e in ckpt.entries if _matches(rule, e, lora_modules)]
        if matched or _config_fires(rule.config, raw):
            hits.append(Hit(rule, matched, config_only=not matched))
    return hits


def _need(rules: EngineRules, rank: int) -> int | None:
    return next((r for r in rules.lora_rank.get("allowed_max", []) if r >= rank), None)


def _message(rules: EngineRules, hit: Hit) -> str:
    r = hit.rule
    n = len(hit.entries)
    where = f"{n} tensor{'s' if n != 1 else ''} in {_few(hit.modules)}" if hit.entries else "set in adapter_config.json"
    verb = {"refused": "refuses", "ignored": "silently ignores", "limit": "limits"}[r.verdict]
    says, advice = r.engine_says, r.advice
    if hit.detail:
        rank, need = hit.detail["rank"], hit.detail["need"]
        says = says.replace("{rank}", str(rank))
        advice = advice.replace("{need}", str(need)) if need else f"rank {rank} is above every max_lora_rank vLLM accepts: merge fully"
    return f"{rules.name} ({rules.checked}) {verb} {r.what}: {where}. It says: {says!r}. Fix: {advice}"


def serve_findings(ckpt: Checkpoint, engine: str = "vllm") -> list[Finding]:
    rules = get_rules(engine)
    out = []
    for hit in evaluate(ckpt, engine):
        severity = "warning" if hit.rule.verdict == "limit" else "error"
        out.append(Finding(f"{engine}-{hit.rule.id}", severity, _message(rules, hit), tuple(e.key for e in hit.entries)[:_MAX_KEYS]))
    return out


def serving_audit(ckpt: Checkpoint, serve: str | None = None) -> list[Finding]:
    """``--serve ENGINE``: one finding per rule that fires. Without it: one ``vllm-incompatible`` info that sums
    up what vLLM refuses or ignores (pointing at ``--serve vllm``), or nothing."""
    if serve is not None:
        return serve_findings(ckpt, serve)
    rules = get_rules("vllm")
    bad = [h for h in evaluate(ckpt, "vllm") if h.rule.verdict in ("refused", "ignored")]
    if not bad:
        return []
    parts = [f"{'ignores' if h.rule.verdict == 'ignored' else 'refuses'} {h.rule.what}" for h in bad]
    keys = tuple(e.key for h in bad for e in h.entries)[:_MAX_KEYS]
    msg = (f"{rules.name} ({rules.checked}) {'; '.join(parts)}: serve a merge, or bake only those parts with "
           "merge --serve vllm (details: audit --serve vllm)")
    return [Finding("vllm-incompatible", "info", msg, keys)]


def baked_entries(ckpt: Checkpoint, engine: str = "vllm") -> tuple[list[Entry], list[Hit]]:
    """The adapter entries a partial merge must bake into the base for ``engine``, and the hits that say so."""
    hits = [h for h in evaluate(ckpt, engine) if h.rule.partial != "keep"]
    keys: set[str] = set()
    for h in hits:
        keys |= {e.key for e in h.entries}
        if h.rule.partial == "bake_module":
            mods = set(h.modules)
            keys |= {e.key for e in ckpt.entries if e.module in mods and e.role is not Role.TOKEN_ROWS}
    return [e for e in ckpt.entries if e.key in keys], hits
