"""The audit's vocabulary: finding codes with their severities, and how findings are built and ordered.

Codes are stable (scripts and CI gates match on them); every check module builds findings through here.
"""

from __future__ import annotations

from typing import Iterable

from .view import Finding

__all__ = ["CODES", "SEVERITY_RANK", "finding", "few", "audit_ok", "ordered"]

CODES: dict[str, str] = {
    "unreadable": "error",
    "empty-tensor": "error",
    "nan-inf": "error",
    "shape-mismatch": "error",
    "unmatched-key": "error",
    "unresolved-target": "error",
    "tied-config-mismatch": "error",
    "noop-adapter": "error",
    "checksum-mismatch": "error",
    "missing-modules-to-save": "error",
    "duplicate-key": "warning",
    "resized-vocab": "warning",
    "strict-false-noop": "warning",
    "unused-target": "warning",
    "tied-weights": "warning",
    "missing-scaling": "warning",
    "noop-lora": "warning",
    "legacy-layout": "info",
    "vllm-incompatible": "info",
    "ambiguous-parameter-lora": "error",
}
SEVERITY_RANK = {"error": 0, "warning": 1, "info": 2}
_MAX_KEYS = 50


def finding(code: str, message: str, keys: Iterable[str] = ()) -> Finding:
    keys = tuple(keys)
    return Finding(code, CODES[code], message, keys[:_MAX_KEYS])


def few(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def audit_ok(findings: Iterable[Finding], strict: bool = False) -> bool:
    """False when any error was found (with ``strict``, any warning too)."""
    bad = ("error", "warning") if strict else ("error",)
    return not any(f.severity in bad for f in findings)


def ordered(findings: list[Finding]) -> list[Finding]:
    return sorted(findings, key=lambda f: SEVERITY_RANK.get(f.severity, 3))
