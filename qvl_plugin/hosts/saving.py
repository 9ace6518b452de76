"""Saving what a recipe asks for from a model that may be sharded: gather first (``gather.py``), refuse
empty tensors, write on rank 0 only. Every trainable tensor is gathered to full size, checked, and only
then written:

* ``adapter/``     the PEFT adapter (PEFT's own ``save_pretrained`` over the gathered state dict),
* ``adapter.pth``  a clean ``torch.save`` dump: one key per trainable tensor, PEFT in-memory names
                   (``base_model.model.…lora_A.default.weight``), loadable with zero unexpected keys
                   into ``get_peft_model(base, config)``,
* ``merged/``      the merged HF model (``qvl_plugin.ckpt.merge.merge`` of the adapter onto the base).

Call :func:`save_outputs` on every process (the gathers are collectives); only rank 0 writes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from ..errors import CheckpointError, QvlError, UsageError
from .gather import EmptyTensorError, aliases, check_tensors, dist_rank, gather_trainable_state_dict, trainable_names, unwrap_model

__all__ = [
    "EmptyTensorError",
    "SavedOutputs",
    "ADAPTER_DIR",
    "DUMP_FILE",
    "MERGED_DIR",
    "unwrap_model",
    "trainable_names",
    "gather_trainable_state_dict",
    "check_tensors",
    "write_pth",
    "write_adapter",
    "write_merged",
    "save_outputs",
    "adapter_key",
]

ADAPTER_DIR = "adapter"
DUMP_FILE = "adapter.pth"
MERGED_DIR = "merged"


@dataclass
class SavedOutputs:
    """Paths written by :func:`save_outputs` (only filled on rank 0)."""

    directory: Path
    adapter: Path | None = None
    pth: Path | None = None
    merged: Path | None = None
    tensors: int = 0
    keys: list[str] = field(default_factory=list)


# -- writers -------------------------------------------------------------------------------------------


def _tmp_sibling(target: Path) -> Path:
    from ..ckpt.outputs import normal_mode

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    normal_mode(tmp, directory=True)  # it becomes the output by a rename: not mkdtemp's 0700
    return tmp


def _commit(tmp: Path, target: Path) -> None:
    """Move ``tmp`` into place; a previous output of ours at ``target`` is replaced."""
    from ..ckpt.outputs import normal_mode

    for p in [tmp, *tmp.rglob("*")] if tmp.is_dir() else [tmp]:  # safetensors >= 0.8 writes via a 0600 temp file
        if not p.is_symlink():
            normal_mode(p, directory=p.is_dir())
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        if old.exists():
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        os.replace(tmp, target)


def write_pth(state_dict: dict[str, torch.Tensor], path: str | Path) -> Path:
    """The clean dump: exactly the given keys, each its own contiguous tensor; written atomically."""
    error = check_tensors(state_dict)
    if error:
        raise EmptyTensorError(error)
    path = Path(path)
    tmp = _tmp_sibling(path)
    try:
        torch.save({k: v.contiguous() for k, v in state_dict.items()}, tmp / path.name)
        os.replace(tmp / path.name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


_MARKED = ".modules_to_save."


def adapter_key(name: str, adapter_name: str = "default") -> str:
    """PEFT in-memory parameter name -> its key in ``adapter_model.safetensors`` (PEFT_FORMAT.md §1.2)."""
    name = name.replace(f".lora_magnitude_vector.{adapter_name}.weight", ".lora_magnitude_vector")
    name = name.replace(f".modules_to_save.{adapter_name}.", ".")
    name = name.replace(f".trainable_tokens_delta.{adapter_name}", ".trainable_tokens_delta")
    return name.replace(f".{adapter_name}.", ".").removesuffix(f".{adapter_name}")


def _base_vocab(model: nn.Module, base_path: str | Path | None) -> int | None:
    """The vocabulary size of the base training started from (its config.json), when it can be read."""
    cfg_dir = base_path or getattr(getattr(model, "peft_config", {}).get("default"), "base_model_name_or_path", None)
    try:
        cfg = json.loads((Path(cfg_dir) / "config.json").read_text()) if cfg_dir else None
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict):
        return None
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    v = text.get("vocab_size", cfg.get("vocab_size"))
    return v if isinstance(v, int) else None


def resized_embeddings(peft_model: nn.Module, base_path: str | Path | None) -> dict[str, torch.Tensor]:
    """New tokens: when the embedding's rows differ from the base's vocabulary, the embedding and head tensors
    (frozen base layers included) that a merge onto the ORIGINAL base needs; PEFT's own "auto" misses this for
    VL configs (no top-level vocab_size). Empty when the vocabulary is the base's (or unknown)."""
    model = unwrap_model(peft_model)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    inner = emb
    for attr in ("token_adapter", "base_layer"):  # TrainableTokensWrapper / LoRA layer -> the nn.Embedding
        if getattr(inner, attr, None) is not None:
            inner = getattr(inner, attr)
    w = getattr(inner, "weight", None)
    rows = w.shape[0] if isinstance(w, torch.Tensor) and w.dim() == 2 else None
    vocab = _base_vocab(model, base_path)
    if rows is None or vocab is None or rows == vocab:
        return {}
    layers = [emb, model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None]
    prefixes = tuple(f"{name}." for name, m in model.named_modules() if any(m is x for x in layers if x is not None))
    return {k: v.detach() for k, v in model.state_dict().items() if k.startswith(prefixes)}


def write_adapter(peft_model: nn.Module, state_dict: dict[str, torch.Tensor], out: str | Path, *,
                  adapter_name: str = "default", aliases: dict[str, list[str]] | None = None,
                  embeddings: dict[str, torch.Tensor] | None = None) -> Path:
    """PEFT's ``save_pretrained`` fed with the gathered state dict, into a temp dir, checked (every trainable
    tensor present, none empty), then moved to ``out``. ``embeddings`` (a resized vocabulary, see
    :func:`resized_embeddings`) are saved too, with ``save_embedding_layers=True``."""
    from safetensors import safe_open

    model = unwrap_model(peft_model)
    full = dict(embeddings or {})
    full.update(state_dict)
    for name, others in (aliases or {}).items():
        for o in others:
            full.setdefault(o, state_dict[name])
    out = Path(out)
    tmp = _tmp_sibling(out)
    try:
        model.save_pretrained(str(tmp), state_dict=full, selected_adapters=[adapter_name], safe_serialization=True,
                              is_main_process=True, save_embedding_layers=bool(embeddings) or "auto")
        src = tmp / adapter_name if (tmp / adapter_name).is_dir() and adapter_name != "default" else tmp
        weights = src / "adapter_model.safetensors"
        if not weights.is_file():
            raise CheckpointError(f"PEFT wrote no adapter_model.safetensors into {out}")
        with safe_open(str(weights), "pt") as f:
            keys = set(f.keys())
            empty = [k for k in keys if 0 in f.get_slice(k).get_shape()]
        missing = [n for n in state_dict if _MARKED in n or "lora_" in n or "trainable_tokens" in n
                   if adapter_key(n, adapter_name) not in keys]
        if missing or empty:
            raise EmptyTensorError(
                f"refusing to save the adapter: missing {missing[:5]} empty {empty[:5]} (PEFT's key selection "
                "did not find the gathered tensors)"
            )
        if src != tmp:
            os.replace(src, tmp.with_name(tmp.name + ".a"))
            shutil.rmtree(tmp)
            tmp = tmp.with_name(tmp.name + ".a")
        _commit(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def write_merged(adapter_dir: str | Path, base_path: str | Path, out: str | Path, *, trained_head: bool) -> Path:
    """Merge with ``qvl_plugin.ckpt.merge.merge`` next to ``out``, check that a trained head stayed untied,
    then move it into place (a previous merged output of ours is replaced only on success)."""
    try:
        from ..ckpt.merge import merge
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("qvl_plugin.ckpt"):
            raise
        raise CheckpointError("the merged output needs qvl_plugin.ckpt.merge, which is not installed") from None

    out = Path(out)
    scratch = _tmp_sibling(out)
    try:
        target = scratch / out.name
        merge(adapter_dir, base_path, target)
        if trained_head:
            cfg = json.loads((target / "config.json").read_text())
            tied = cfg.get("tie_word_embeddings", (cfg.get("text_config") or {}).get("tie_word_embeddings", False))
            if tied:
                raise CheckpointError(
                    f"{out}: the merged config says tie_word_embeddings=true although lm_head was trained apart "
                    "from the embedding; a reload would re-tie and discard the trained head (peft#2777)"
                )
        _commit(target, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out


def _trains_head(state_dict: dict[str, torch.Tensor]) -> bool:
    """True when a trained lm_head differs from the embedding: the merged model must then be untied."""
    heads = [k for k in state_dict if ".lm_head." in f".{k}" and ("modules_to_save" in k or "token_adapter" in k or "lora_" in k)]
    if not heads:
        return False
    embeds = {k.replace("lm_head", "model.language_model.embed_tokens"): k for k in heads}
    return any(e not in state_dict or not torch.equal(state_dict[e], state_dict[h]) for e, h in embeds.items())


def save_outputs(model: nn.Module, directory: str | Path, formats: Iterable[str], *, base_path: str | Path | None = None,
                 adapter_name: str = "default") -> SavedOutputs:
    """Gather and write ``formats`` (``adapter``, ``pth``, ``merged``) into ``directory``. Call on every rank.

    ``merged`` needs ``base_path`` (the HF model dir the training started from); it is made from the
    adapter (written to a temp dir when ``adapter`` itself is not asked for).
    """
    formats = tuple(formats)
    unknown = [f for f in formats if f not in ("adapter", "pth", "merged")]
    if unknown:
        raise UsageError(f"unknown save format(s) {unknown}; known: adapter, pth, merged")
    if "merged" in formats and base_path is None:
        raise UsageError("saving 'merged' needs base_path (the HF model dir the training started from)")
    directory = Path(directory)
    state_dict = gather_trainable_state_dict(model)
    distributed, rank = dist_rank()
    result = SavedOutputs(directory)
    error: str | None = None
    try:
        if rank == 0:
            try:
                _write(model, state_dict, directory, formats, base_path, adapter_name, result)
            except QvlError as e:
                if "merged" in formats or not distributed:
                    raise
                error = str(e)
    finally:
        del state_dict
    if distributed and "merged" not in formats:
        # Keep ranks in step and fail together; after a merge (which can outlast a collective's timeout)
        # the other ranks simply go on.
        box = [error]
        torch.distributed.broadcast_object_list(box, src=0)
        if box[0]:
            raise CheckpointError(box[0])
    return result


def _write(model, state_dict, directory: Path, formats, base_path, adapter_name: str, result: SavedOutputs) -> None:
    result.tensors, result.keys = len(state_dict), list(state_dict)
    directory.mkdir(parents=True, exist_ok=True)
    if "pth" in formats:
        result.pth = write_pth(state_dict, directory / DUMP_FILE)
    if "adapter" not in formats and "merged" not in formats:
        return
    scratch = None if "adapter" in formats else Path(tempfile.mkdtemp(prefix=".adapter.", dir=directory))
    target = directory / ADAPTER_DIR if scratch is None else scratch / ADAPTER_DIR
    try:
        adapter = write_adapter(model, state_dict, target, adapter_name=adapter_name, aliases=aliases(model),
                                embeddings=resized_embeddings(model, base_path))
        if scratch is None:
            result.adapter = adapter
        if "merged" in formats:
            result.merged = write_merged(adapter, base_path, directory / MERGED_DIR, trained_head=_trains_head(state_dict))
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
