"""The lazy checkpoint view: every command opens its inputs here and sees one name space.

For each tensor: its canonical module path (transformers >= 4.52 in-memory naming, see
``qvl_plugin.layouts``), the base parameter it acts on, its role, shape, dtype, byte size and a loader
that reads it only when asked. Merge, convert, diff and audit never parse key strings themselves.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Literal

from ..errors import CheckpointError
from ..layouts import Layout, detect_layout
from .adapter_config import AdapterSettings, load_adapter_config
from .dtypes import itemsize, torch_dtype
from .formats import RawCheckpoint, RawTensor, detect_format, read_raw
from .keys import LORA_ROLES, PEFT_PREFIX, REPLACE_ROLES, ParsedKey, Role, parse_key
from .param_targets import resolve_wrapped
from .safety import read_json

if TYPE_CHECKING:
    import torch

__all__ = ["Checkpoint", "Entry", "Finding", "Role", "open_checkpoint", "LORA_ROLES", "REPLACE_ROLES"]

Severity = Literal["error", "warning", "info"]


@dataclass(frozen=True)
class Finding:
    code: str
    severity: Severity
    message: str
    keys: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {"code": self.code, "severity": self.severity, "message": self.message, "keys": list(self.keys)}


@dataclass(frozen=True)
class Entry:
    key: str
    module: str
    param: str
    role: Role
    shape: tuple[int, ...]
    dtype_name: str  # torch's name ("bfloat16"): header-only work never imports torch
    nbytes: int
    source_module: str
    _load: Callable[[], "torch.Tensor"] = field(repr=False, compare=False)
    location: tuple[Path, int] | None = field(default=None, repr=False, compare=False)
    """(file, byte offset) of the raw data when stored in safetensors: lets writers read rows or copy bytes."""
    wrapper_depth: int | None = None
    """A ``target_parameters`` LoRA factor (PEFT ParamWrapper): its nesting depth (0 = outermost), else None."""

    @property
    def param_wrapper(self) -> bool:
        return self.wrapper_depth is not None

    @property
    def target(self) -> str:
        """The canonical base tensor this entry is, replaces or modifies."""
        return f"{self.module}.{self.param}" if self.module else self.param

    @property
    def dtype(self) -> "torch.dtype":
        return torch_dtype(self.dtype_name)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def load(self) -> "torch.Tensor":
        """Read this tensor (and only this one). Treat the result as read-only."""
        return self._load()


@dataclass
class Checkpoint:
    path: Path
    format: str
    layout: Layout
    entries: list[Entry]
    files: list[Path]
    adapter: AdapterSettings | None = None
    config: dict | None = None
    findings: list[Finding] = field(default_factory=list)
    _close: Callable[[], None] = field(default=lambda: None, repr=False)

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._close()

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def by_target(self) -> dict[str, list[Entry]]:
        out: dict[str, list[Entry]] = defaultdict(list)
        for e in self.entries:
            out[e.target].append(e)
        return dict(out)

    def by_module(self) -> dict[str, list[Entry]]:
        out: dict[str, list[Entry]] = defaultdict(list)
        for e in self.entries:
            out[e.module].append(e)
        return dict(out)

    @property
    def is_adapter(self) -> bool:
        return self.format in ("pth", "peft")

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    @property
    def tie_word_embeddings(self) -> bool | None:
        """The config's tie flag (text_config wins over the default when only it is set)."""
        cfg = self.config or {}
        if "tie_word_embeddings" in cfg:
            return bool(cfg["tie_word_embeddings"])
        text = cfg.get("text_config") or {}
        if isinstance(text, dict) and "tie_word_embeddings" in text:
            return bool(text["tie_word_embeddings"])
        return None


def _nbytes(shape: tuple[int, ...], dtype_name: str) -> int:
    return math.prod(shape) * itemsize(dtype_name)


_NDIM = {
    Role.LORA_A: (2, 3, 4, 5),  # Linear (r, in); Conv1d/2d/3d (r, in, *k)
    Role.LORA_B: (2, 3, 4, 5),
    Role.EMB_A: (2,),
    Role.EMB_B: (2,),
    Role.LORA_BIAS: (1,),
    Role.MAGNITUDE: (1, 2, 3, 4, 5),  # (out,) or conv (1, out, 1, ...)
    Role.TOKEN_ROWS: (2,),
}


def _plausible_ndim(e: "Entry") -> bool:
    """Zero-element tensors pass here (audit reports them as ZeRO-3 artefacts); others must fit their role."""
    allowed = _NDIM.get(e.role)
    return allowed is None or len(e.shape) in allowed


def _equal(a: RawTensor, b: RawTensor) -> bool:
    import torch  # duplicates exist only in pickles, which imported torch already

    return torch.equal(a.load(), b.load())


def _dedupe(tensors: list[RawTensor]) -> tuple[list[RawTensor], list[Finding]]:
    """Fold the manual dump's leading-dot duplicates (``.x`` next to ``x``) into one tensor each."""
    groups: dict[str, list[RawTensor]] = defaultdict(list)
    for t in tensors:
        groups[t.key.lstrip(".")].append(t)
    kept: list[RawTensor] = []
    dup_keys: list[str] = []
    for name, group in groups.items():
        keep = next((t for t in group if t.key == name), group[0])
        for other in group:
            if other is keep:
                continue
            same = other.storage is not None and other.storage == keep.storage
            if not same and (other.shape != keep.shape or other.dtype_name != keep.dtype_name or not _equal(other, keep)):
                raise CheckpointError(f"keys {keep.key!r} and {other.key!r} name the same tensor with different values")
            dup_keys.append(other.key)
        kept.append(RawTensor(name, keep.shape, keep.dtype_name, keep.load, keep.storage))
    findings = []
    if dup_keys:
        findings.append(
            Finding(
                "duplicate-key",
                "warning",
                f"{len(dup_keys)} tensors stored twice under a leading-dot name (the manual dump's root-module "
                "duplicates); read once",
                tuple(sorted(dup_keys)),
            )
        )
    return kept, findings


def _layout_hints(raw: RawCheckpoint, adapter: AdapterSettings | None) -> tuple[dict | None, str | None]:
    """config.json for layout detection: the model's own, or the adapter's local base, or auto_mapping."""
    if raw.config is not None:
        return raw.config, None
    hint = None
    if adapter is not None:
        auto = adapter.raw.get("auto_mapping") or {}
        hint = " ".join(str(x) for x in (adapter.base_model_name_or_path, isinstance(auto, dict) and auto.get("base_model_class")) if x)
        base = adapter.base_model_name_or_path
        if base:
            try:
                cfg_path = Path(base) / "config.json"
                if cfg_path.is_file():
                    cfg = read_json(cfg_path)
                    if isinstance(cfg, dict):
                        return cfg, hint
            except (OSError, CheckpointError):
                pass
    return None, hint or None


def open_checkpoint(
    path: str | Path,
    *,
    format: str | None = None,
    adapter_config: str | Path | AdapterSettings | None = None,
    lora_alpha: float | None = None,
    layout: Layout | None = None,
) -> Checkpoint:
    """Open any checkpoint lazily. Reads headers (safetensors) or the pickle structure (mmap), no data.

    ``adapter_config``/``lora_alpha`` supply LoRA settings a ``.pth`` dump lacks (or override a PEFT dir's).
    ``layout`` forces a family (normally detected from config.json, hints and key names).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    fmt = format or detect_format(path)
    raw = read_raw(path, fmt)
    try:
        return _build(raw, adapter_config, lora_alpha, layout)
    except BaseException:
        raw.close()
        raise


def _build(raw: RawCheckpoint, adapter_config, lora_alpha, layout) -> Checkpoint:
    findings = [Finding(c, s, m, k) for c, s, m, k in raw.notes]
    adapter: AdapterSettings | None = None
    if isinstance(adapter_config, AdapterSettings):
        adapter = adapter_config
    elif adapter_config is not None:
        adapter = load_adapter_config(adapter_config)
    elif raw.adapter_config is not None:
        adapter = AdapterSettings.from_dict(raw.adapter_config)
    if lora_alpha is not None:  # a copy: never change settings the caller passed in
        adapter = dataclasses.replace(adapter or AdapterSettings(), lora_alpha=float(lora_alpha))

    tensors = raw.tensors
    if raw.format == "pth":
        tensors, dup = _dedupe(tensors)
        findings += dup

    is_adapter = raw.format in ("pth", "peft")
    parsed = []
    unprefixed, ignored, adapters = [], [], set()
    for t in tensors:
        key = t.key
        if is_adapter:
            if key.startswith(PEFT_PREFIX):
                key = key[len(PEFT_PREFIX):]
            elif raw.format == "peft":
                unprefixed.append(t.key)
            p = parse_key(key, default_role=Role.FULL)
        else:
            module, _, param = key.rpartition(".")
            p = ParsedKey(module, param, Role.BASE, None, False)
        if p is None:
            ignored.append(t.key)
            continue
        if p.adapter:
            adapters.add(p.adapter)
        parsed.append((t, p))

    cfg, hint = _layout_hints(raw, adapter)
    if layout is None:
        layout = detect_layout((p.module for _, p in parsed), config=cfg, hint=hint)

    wrapped, wrap_problems = resolve_wrapped([p for _, p in parsed], adapter, layout) if is_adapter else ({}, [])
    if wrap_problems:
        findings.append(Finding("ambiguous-parameter-lora", "error", "; ".join(wrap_problems[:3]), ()))
    entries = []
    for i, (t, p) in enumerate(parsed):
        w = wrapped.get(i)
        module, param = (w.module, w.param) if w is not None else (p.module, p.param)
        entries.append(
            Entry(
                key=t.key,
                module=layout.canonical(module),
                param=param,
                role=p.role,
                shape=t.shape,
                dtype_name=t.dtype_name,
                nbytes=_nbytes(t.shape, t.dtype_name),
                source_module=module,
                _load=t.load,
                location=t.location,
                wrapper_depth=w.depth if w is not None else None,
            )
        )

    bad = [e.key for e in entries if e.numel and not _plausible_ndim(e)]
    if bad:
        raise CheckpointError(f"{len(bad)} LoRA tensors have an impossible number of dimensions, e.g. {bad[0]!r}")
    if ignored:
        findings.append(Finding("ignored-keys", "info", f"{len(ignored)} frozen-copy keys ignored (original_module / stray modules_to_save)", tuple(ignored[:50])))
    if unprefixed:
        findings.append(Finding("unprefixed-key", "warning", f"{len(unprefixed)} adapter keys lack the '{PEFT_PREFIX}' prefix", tuple(unprefixed[:50])))
    if len(adapters) > 1:
        findings.append(Finding("multiple-adapters", "error", f"keys of several adapters in one file: {', '.join(sorted(adapters))}", ()))
    elif adapters and raw.format == "peft":
        findings.append(Finding("in-memory-names", "warning", f"adapter keys still carry the adapter name {next(iter(adapters))!r} (in-memory names)", ()))
    if is_adapter:
        legacy = sorted({e.key for e in entries if e.module != e.source_module})
        if legacy:
            findings.append(
                Finding(
                    "legacy-layout",
                    "info",
                    f"{len(legacy)} keys use the pre-4.52 transformers layout (model.layers.* / visual.*); "
                    "qvl-ckpt maps them, PEFT's from_pretrained on transformers >= 4.52 would not",
                    tuple(legacy[:50]),
                )
            )
    return Checkpoint(
        path=raw.path,
        format=raw.format,
        layout=layout,
        entries=entries,
        files=raw.files,
        adapter=adapter,
        config=cfg if raw.format == "merged" else raw.config,
        findings=findings,
        _close=raw.close,
    )
