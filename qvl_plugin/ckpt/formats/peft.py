"""PEFT adapter directories (``save_pretrained`` output, Trainer ``checkpoint-N/`` dirs)."""

from __future__ import annotations

from pathlib import Path

from ...errors import CheckpointError
from ..safety import read_json, safe_torch_load
from . import RawCheckpoint
from .pth import tensors_from_state_dict
from .safetensors_io import SafetensorsFile

__all__ = ["read", "EXTRA_FULL_FILES"]

#: Files next to the adapter whose tensors are part of it, as full replacements: ms-swift's ``lora_llm``
#: tuner trains the ViT/aligner whole and saves them (PeftModel parameter names) to ``vit.safetensors``.
EXTRA_FULL_FILES = ("vit.safetensors",)


def read(path: Path) -> RawCheckpoint:
    directory = path if path.is_dir() else path.parent
    cfg_path = directory / "adapter_config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{directory}: no adapter_config.json (not a PEFT adapter)")
    adapter_config = read_json(cfg_path)
    st, binf = directory / "adapter_model.safetensors", directory / "adapter_model.bin"
    if path.is_file() and path.name.startswith("adapter_model"):
        weights = path
    elif st.is_file():
        weights = st
    elif binf.is_file():
        weights = binf
    else:
        raise CheckpointError(f"{directory}: adapter_config.json but no adapter_model.safetensors or adapter_model.bin")
    if weights.suffix == ".safetensors":
        f = SafetensorsFile(weights)
        tensors, notes, close = f.tensors(), [], f.close
    else:
        tensors, notes = tensors_from_state_dict(safe_torch_load(weights), weights.name)
        close = lambda: None
    files = [weights]
    closers = [close]
    try:
        for name in EXTRA_FULL_FILES:
            extra = directory / name
            if not extra.is_file():
                continue
            g = SafetensorsFile(extra)
            closers.append(g.close)
            more = g.tensors()
            clash = sorted({t.key for t in tensors} & {t.key for t in more})
            if clash:
                raise CheckpointError(f"{directory.name}: {name} and {weights.name} both hold {clash[0]!r}")
            tensors = list(tensors) + list(more)
            files.append(extra)
            notes = list(notes) + [("extra-weights", "info", f"{len(more)} tensors from {name} (ms-swift lora_llm: fully trained ViT/aligner) read as full replacements", ())]
    except BaseException:
        for c in closers:
            c()
        raise

    def close_all() -> None:
        for c in closers:
            c()

    return RawCheckpoint("peft", directory, tensors, files, adapter_config=adapter_config, notes=notes, close=close_all)
