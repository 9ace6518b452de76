"""Will this checkpoint load, and does it do what was trained? Findings with stable codes.

Header-only checks (shapes against the base, unmatched keys, empty tensors, tied weights, key grammar)
run first; the checks that need values (NaN/Inf, no-op adapter) stream one tensor at a time. A file
that cannot be parsed safely is itself a finding (``unreadable``), not a crash.

Codes: unreadable, empty-tensor, nan-inf, shape-mismatch, unmatched-key, unresolved-target, noop-adapter
(errors); unused-target, duplicate-key, strict-false-noop, tied-weights, missing-scaling, noop-lora (warnings); legacy-layout,
vllm-incompatible (info). Findings the view itself reports (e.g. unprefixed-key) are passed through.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError
from .audit_header import header_checks
from .audit_targets import target_checks
from .checksums import CHECKSUM_NAME, verify_manifest
from .serve_audit import serving_audit
from .findings import CODES, SEVERITY_RANK, audit_ok, few, finding, ordered
from .view import Checkpoint, Finding, open_checkpoint

__all__ = ["audit", "audit_ok", "CODES", "SEVERITY_RANK"]


def audit(
    src: str | Path,
    *,
    base: str | Path | None = None,
    adapter_config: str | Path | None = None,
    lora_alpha: float | None = None,
    format: str | None = None,
    serve: str | None = None,
) -> list[Finding]:
    """Audit SRC (any format), optionally against BASE (a full model). Never raises for a bad file:
    a checkpoint that cannot be opened safely is reported as ``unreadable``. ``serve="vllm"`` adds the
    engine's serving rules (``serve_audit``)."""
    findings: list[Finding] = []
    base_ckpt: Checkpoint | None = None
    if base is not None:
        try:
            base_ckpt = open_checkpoint(base)
        except CheckpointError as e:
            findings.append(finding("unreadable", f"base: {e}", (str(base),)))
        else:
            if base_ckpt.is_adapter:
                base_ckpt.close()
                base_ckpt = None
                findings.append(finding("unreadable", f"base: {base} is an adapter, not a full model", (str(base),)))
    try:
        layout = base_ckpt.layout if base_ckpt is not None and base_ckpt.layout.name != "unknown" else None
        try:
            ckpt = open_checkpoint(src, format=format, adapter_config=adapter_config, lora_alpha=lora_alpha, layout=layout)
        except CheckpointError as e:
            findings.append(finding("unreadable", str(e), (str(src),)))
            return ordered(findings)
        with ckpt:
            findings += ckpt.findings
            findings += _checksums(ckpt)
            findings += header_checks(ckpt, base_ckpt)
            findings += serving_audit(ckpt, serve)
            findings += target_checks(ckpt, base_ckpt)
            from .audit_values import value_checks  # reads values: torch from here on

            findings += value_checks(ckpt, base_ckpt)
    finally:
        if base_ckpt is not None:
            base_ckpt.close()
    return ordered(findings)


def _checksums(ckpt: Checkpoint) -> list[Finding]:
    """Verify the SHA256SUMS manifest that ``merge --checksum`` writes, when present."""
    try:
        bad = verify_manifest(ckpt.path) if ckpt.path.is_dir() else None
    except CheckpointError as e:
        return [finding("checksum-mismatch", str(e), (CHECKSUM_NAME,))]
    if not bad:
        return []
    return [finding("checksum-mismatch", f"{len(bad)} files differ from {CHECKSUM_NAME}: {few(bad)}", bad)]
