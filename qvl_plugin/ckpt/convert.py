"""Convert between a manual ``.pth`` dump and a PEFT adapter directory, losslessly.

``pth -> peft``: saved PEFT names (``base_model.model.<in-memory path>.lora_A.weight``, modules_to_save under
the base's own parameter name), rank from the shapes, targets and modules_to_save from the keys, alpha from
``--adapter-config`` / ``--lora-alpha`` (never guessed). The result loads with ``PeftModel.from_pretrained``.

``peft -> pth``: one key per tensor under PEFT's *in-memory* names (adapter ``default``, current
transformers layout), i.e. exactly the keys of ``get_peft_model(base, config).state_dict()``, so
``load_state_dict(strict=False)`` reports no unexpected keys. Tensors are copied bit for bit both ways.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .declared import WAYS_OUT, undelivered
from ..errors import AdapterConfigError, UsageError
from .adapter_config import AdapterSettings
from .config_names import map_config_names
from .keys import PEFT_PREFIX, Role, lora_suffix
from .merge_plan import open_adapter
from .reader import TensorReader
from .view import Checkpoint, Entry, open_checkpoint
from .outputs import atomic_file
from .shards import TensorSpec, plan_shards
from .writer import CheckpointWriter

__all__ = ["ConvertReport", "convert", "peft_key", "memory_key", "infer_adapter_config", "load_report", "write_adapter_dir", "ADAPTER_NAME"]

ADAPTER_NAME = "default"
_LORA = (Role.LORA_A, Role.LORA_B, Role.LORA_BIAS, Role.EMB_A, Role.EMB_B, Role.MAGNITUDE)


@dataclass
class ConvertReport:
    out: Path
    to: str
    tensors: int
    config: dict | None = None
    load: dict | None = None  # {"unexpected": [...], "missing_adapter": [...]} when a base was given
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["out"] = str(self.out)
        return d


def _via_base_layer(e: Entry) -> bool:
    return ".base_layer." in e.key


def _tokens_suffix(e: Entry, settings: AdapterSettings | None) -> str:
    plain = ".token_adapter." not in e.key and (settings is not None and settings.peft_type == "TRAINABLE_TOKENS")
    return "trainable_tokens_delta" if plain else "token_adapter.trainable_tokens_delta"


def _nested(e: Entry) -> str:
    """A target_parameters LoRA lives on a (possibly nested) ParamWrapper: ``module(.base_layer)*depth``."""
    return e.module + ".base_layer" * (e.wrapper_depth or 0)


def peft_key(e: Entry, settings: AdapterSettings | None = None) -> str:
    """The saved PEFT key of an entry (``save_pretrained`` naming, in-memory module path)."""
    m = _nested(e)
    if e.role in (Role.FULL, Role.BIAS):
        return f"{PEFT_PREFIX}{m}.base_layer.{e.param}" if _via_base_layer(e) else f"{PEFT_PREFIX}{m}.{e.param}"
    if e.role is Role.TOKEN_ROWS:
        return f"{PEFT_PREFIX}{m}.{_tokens_suffix(e, settings)}"
    return f"{PEFT_PREFIX}{m}.{lora_suffix(e.role)}"


def memory_key(e: Entry, settings: AdapterSettings | None = None, lora_modules: frozenset[str] = frozenset(), adapter: str = ADAPTER_NAME) -> str:
    """The key of an entry in ``get_peft_model(base, config).state_dict()`` (in-memory naming)."""
    m = _nested(e)
    if e.role is Role.FULL:
        if _via_base_layer(e) or m in lora_modules:
            return f"{PEFT_PREFIX}{m}.base_layer.{e.param}"
        return f"{PEFT_PREFIX}{m}.modules_to_save.{adapter}.{e.param}"
    if e.role is Role.BIAS:
        return f"{PEFT_PREFIX}{m}.base_layer.{e.param}" if (_via_base_layer(e) or m in lora_modules) else f"{PEFT_PREFIX}{m}.{e.param}"
    if e.role is Role.TOKEN_ROWS:
        return f"{PEFT_PREFIX}{m}.{_tokens_suffix(e, settings)}.{adapter}"
    return f"{PEFT_PREFIX}{m}.{lora_suffix(e.role, adapter)}"


def _pattern(module: str) -> str:
    return re.escape(module)


def _wrapped_ranks(wrapped: list[Entry], base: str | Path | None) -> dict[str, int]:
    """True ranks of target_parameters LoRA (``lora_A`` has r·E rows): E from the base's config.json."""
    if not wrapped:
        return {}
    shapes: dict[str, tuple[int, ...]] = {}
    if base is not None and Path(base).exists():
        with open_checkpoint(base) as b:
            shapes = {x.target: x.shape for x in b.entries}
    out = {}
    for e in wrapped:
        shape = shapes.get(e.target)
        n = 1 if shape is not None and len(shape) == 2 else shape[0] if shape is not None else None
        if n is None or e.shape[0] % n:
            raise AdapterConfigError(
                f"{e.key}: a target_parameters LoRA on a 3-D (expert) parameter holds r·E rows; pass --base or "
                "--adapter-config to tell the rank"
            )
        out[e.target] = e.shape[0] // n
    return out


def _mapped_config(ckpt: Checkpoint) -> dict:
    """The checkpoint's real adapter_config.json with every module name in the layout the keys are written in."""
    lora = {e.module for e in ckpt.entries if e.role in _LORA}
    full = {e.module for e in ckpt.entries if e.role is Role.FULL and not _via_base_layer(e) and e.module not in lora}
    modules = {e.module for e in ckpt.entries if e.role in _LORA and not e.param_wrapper}  # target_parameters are not modules
    return map_config_names(ckpt.adapter.raw, ckpt.layout, modules, full).config


def infer_adapter_config(ckpt: Checkpoint, base: str | Path | None = None) -> dict:
    """adapter_config.json for a dump: from ``--adapter-config`` when given, else inferred from the keys.

    Rank from the shapes (the most common one; others as ``rank_pattern`` on exact module paths), targets
    and modules_to_save as exact in-memory module paths, alpha from ``--lora-alpha`` (never guessed).
    """
    s = ckpt.adapter
    entries = ckpt.entries
    lora = [e for e in entries if e.role in (Role.LORA_A, Role.EMB_A)]
    has_lora = any(e.role in _LORA for e in entries)
    if has_lora and (s is None or s.lora_alpha is None and not s.alpha_pattern):
        raise AdapterConfigError(
            f"{ckpt.path.name} carries no lora_alpha: pass --adapter-config (the run's adapter_config.json) or --lora-alpha; it is never guessed"
        )
    tokens = [e for e in entries if e.role is Role.TOKEN_ROWS]
    if tokens and (s is None or s.trainable_token_indices is None):
        raise AdapterConfigError("the dump has trainable-token rows but their indices live only in adapter_config.json: pass --adapter-config")
    if s is not None and s.raw.get("peft_type") is not None:  # a real adapter_config.json: keep it, fill the identity
        cfg = _mapped_config(ckpt)
        if s.lora_alpha is not None:
            cfg["lora_alpha"] = s.lora_alpha if not float(s.lora_alpha).is_integer() else int(s.lora_alpha)
    else:
        wrapped = [e for e in lora if e.param_wrapper]
        ranks = {e.module: e.shape[0] for e in lora if not e.param_wrapper}
        ranks.update(_wrapped_ranks(wrapped, base))
        common = Counter(ranks.values()).most_common(1)[0][0] if ranks else 8
        lora_modules = {e.module for e in entries if e.role in _LORA and not e.param_wrapper}
        full = sorted({e.module for e in entries if e.role is Role.FULL and not _via_base_layer(e) and e.module not in lora_modules})
        bias = [e for e in entries if e.role is Role.BIAS]
        alpha = s.lora_alpha if s is not None and s.lora_alpha is not None else 8
        cfg = {
            "peft_type": "LORA",
            "task_type": None,
            "r": common,
            "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
            "target_modules": sorted(lora_modules),
            "target_parameters": sorted({e.target for e in wrapped}) or None,
            "rank_pattern": {_pattern(m): r for m, r in sorted(ranks.items()) if r != common},
            "alpha_pattern": {},
            "modules_to_save": full or None,
            "use_dora": any(e.role is Role.MAGNITUDE for e in entries),
            "use_rslora": bool(s.use_rslora) if s is not None else False,
            "lora_bias": any(e.role is Role.LORA_BIAS for e in entries),
            "bias": "all" if any(e.module not in lora_modules for e in bias) else "lora_only" if bias else "none",
            "fan_in_fan_out": False,
            "init_lora_weights": True,
            "lora_dropout": 0.0,
            "inference_mode": True,
            "trainable_token_indices": None,
            "base_model_name_or_path": None,
        }
    if base is not None:
        cfg["base_model_name_or_path"] = str(base)
    return cfg


def convert(
    src: str | Path,
    to: str,
    out: str | Path,
    *,
    base: str | Path | None = None,
    adapter_config: str | Path | None = None,
    lora_alpha: float | None = None,
    force: bool = False,
    check_load: bool = True,
    base_name: str | None = None,
) -> ConvertReport:
    """Convert SRC (``.pth`` dump or PEFT dir) to ``to`` = ``"peft"`` or ``"pth"`` at OUT.

    With ``base`` and ``to="pth"``, the report also holds the result of loading the dump into
    ``get_peft_model(base, config)`` on the meta device (unexpected keys must be none). ``base_name`` is
    what ``base_model_name_or_path`` records (default: ``base``), e.g. the hub id a cached base came from.
    """
    if to not in ("peft", "pth"):
        raise UsageError(f"--to must be peft or pth, not {to!r}")
    base_ckpt = None
    if base is not None and Path(base).exists():
        base_ckpt = open_checkpoint(base)
    try:
        with open_adapter(src, base_ckpt, adapter_config=adapter_config, lora_alpha=lora_alpha) as ckpt:
            errors = [f for f in ckpt.findings if f.severity == "error"]
            if errors:
                raise AdapterConfigError(f"{ckpt.path.name}: {errors[0].message}")
            missing = undelivered(ckpt, {e.module for e in base_ckpt.entries} if base_ckpt is not None else None)
            if missing:
                raise AdapterConfigError(f"{ckpt.path.name}: declares {', '.join(missing)} in modules_to_save/trainable "
                                         f"tokens but holds no weights for them (saved keeping only 'lora_' keys, like "
                                         f"Qwen-VL finetune.py); converting would carry the loss along. {WAYS_OUT}")
            if to == "peft":
                return _to_peft(ckpt, Path(out), src, base, force, base_name)
            return _to_pth(ckpt, Path(out), src, base, force, check_load)
    finally:
        if base_ckpt is not None:
            base_ckpt.close()


def _to_peft(ckpt: Checkpoint, out: Path, src, base, force: bool, base_name: str | None = None) -> ConvertReport:
    cfg = infer_adapter_config(ckpt, base_name if base_name is not None else base)
    n = write_adapter_dir(ckpt, ckpt.entries, cfg, out, [src, base], force=force)
    notes = []
    if ckpt.adapter is None or ckpt.adapter.raw.get("peft_type") is None:
        notes.append("adapter_config.json inferred from the keys (targets and modules_to_save as exact module paths); use_rslora=false")
    return ConvertReport(out=out, to="peft", tensors=n, config=cfg, notes=notes)


def write_adapter_dir(ckpt: Checkpoint, entries: list[Entry], cfg: dict, out: Path, inputs, force: bool = False) -> int:
    """Write ``entries`` of ``ckpt`` under their saved PEFT names plus ``cfg`` as a PEFT adapter dir (atomic)."""
    keys = [peft_key(e, ckpt.adapter) for e in entries]
    dup = [k for k, n in Counter(keys).items() if n > 1]
    if dup:
        raise AdapterConfigError(f"two tensors map to the same PEFT key {dup[0]!r} (mixed layouts in one dump?)")
    specs = [TensorSpec(k, e.shape, e.dtype) for k, e in zip(keys, entries)]
    plan = plan_shards(specs, 1 << 62, filename="adapter_model.safetensors")
    by_key = dict(zip(keys, entries))
    reader = TensorReader(ckpt)
    try:
        with CheckpointWriter(out, plan, inputs=inputs, force=force) as w:
            for spec in plan.order:
                w.write(spec.name, reader.whole(by_key[spec.name]).contiguous())
            w.write_json("adapter_config.json", cfg, sort_keys=True)
            w.commit()
    finally:
        reader.close()
    return len(specs)


def _to_pth(ckpt: Checkpoint, out: Path, src, base, force: bool, check_load: bool) -> ConvertReport:
    if out.suffix not in (".pth", ".pt", ".bin"):
        raise UsageError(f"output {out.name}: a dump is one file; name it *.pth")
    lora_modules = frozenset(e.module for e in ckpt.entries if e.role in _LORA)
    reader = TensorReader(ckpt)
    sd: dict[str, torch.Tensor] = {}
    try:
        for e in ckpt.entries:
            k = memory_key(e, ckpt.adapter, lora_modules)
            if k in sd:
                raise AdapterConfigError(f"two tensors map to the same in-memory key {k!r}")
            sd[k] = reader.whole(e).clone()  # own storage: one key per tensor
    finally:
        reader.close()
    cfg = _mapped_config(ckpt) if ckpt.adapter is not None and ckpt.adapter.raw.get("peft_type") else None
    report = ConvertReport(out=out, to="pth", tensors=len(sd), config=cfg)
    if base is not None and check_load and cfg is not None:  # before writing: a failing command leaves no output
        report.load = load_report(set(sd), base, cfg)
    with atomic_file(out, [src, base], force) as tmp:
        with open(tmp, "wb") as f:  # a Python file object: a full disk surfaces as OSError, not torch's RuntimeError
            torch.save(sd, f)
    return report


def load_report(keys: set[str], base: str | Path, adapter_config: dict) -> dict | None:
    """What ``get_peft_model(base, config).load_state_dict(dump, strict=False)`` would report, computed on
    the meta device (no weights read): unexpected keys, and adapter keys the dump does not fill."""
    import warnings

    import transformers
    from peft import PeftConfig, get_peft_model

    try:
        cfg = transformers.AutoConfig.from_pretrained(str(base), trust_remote_code=False)  # never run or ask
    except Exception as e:  # noqa: BLE001 - remote-code or unknown configs: no check, say why
        return {"skipped": f"cannot build the model from {Path(base).name}/config.json ({type(e).__name__})"}
    arch = (getattr(cfg, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        return {"skipped": f"unknown architecture {arch!r}"}
    peft_cfg = dict(adapter_config)
    peft_cfg.pop("peft_version", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            model = cls._from_config(cfg)
        try:
            peft_model = get_peft_model(model, PeftConfig.from_peft_type(**peft_cfg))
        except (ValueError, TypeError, KeyError) as e:  # PEFT's NoMatchingPeftModuleError is a ValueError
            raise AdapterConfigError(f"get_peft_model({Path(base).name}, adapter config) fails: {str(e).splitlines()[0]}") from None
    state = set(peft_model.state_dict())
    unexpected = sorted(keys - state)
    params = {n for n, _ in peft_model.named_parameters()}  # one name per parameter: tied copies count once
    missing = sorted(k for k in params - keys if (".lora_" in k or "modules_to_save" in k or "trainable_tokens_delta" in k))
    return {"unexpected": unexpected, "missing_adapter": missing}
