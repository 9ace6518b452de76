"""Full Hugging Face model weights: one file, a sharded index, legacy ``pytorch_model.bin``, or a bare
``.safetensors`` file."""

from __future__ import annotations

from pathlib import Path

from ...errors import CheckpointError, UnsafeCheckpointError
from ..safety import read_json, resolve_inside, safe_torch_load
from . import RawCheckpoint, RawTensor
from .pth import tensors_from_state_dict
from .safetensors_io import SafetensorsFile

__all__ = ["read", "weight_files"]

_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLES = ("model.safetensors", "pytorch_model.bin")


def weight_files(directory: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The weight files of a model dir, and the index's weight_map when sharded."""
    for index_name in _INDEXES:
        index_path = directory / index_name
        if index_path.is_file():
            index = read_json(index_path)
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index_name}: no weight_map")
            files: dict[str, Path] = {}
            for key, rel in weight_map.items():
                if not isinstance(rel, str):
                    resolve_inside(directory, rel)  # raises: only file names are allowed
                if rel not in files:
                    resolve_inside(directory, rel)  # raises when it escapes the directory
                    files[rel] = directory / rel  # keep the name: HF cache blobs have no suffix
                    if not files[rel].is_file():
                        raise CheckpointError(f"{index_name}: shard {rel!r} is missing")
            return list(files.values()), weight_map
    for single in _SINGLES:
        if (directory / single).is_file():
            return [directory / single], None
    found = sorted(directory.glob("*.safetensors"))
    if len(found) == 1:
        return found, None
    if found:
        raise CheckpointError(f"{directory}: {len(found)} .safetensors files but no model.safetensors.index.json")
    raise CheckpointError(f"{directory}: no model weights (model.safetensors[.index.json] or pytorch_model.bin)")


def read(path: Path) -> RawCheckpoint:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    config = None
    if path.is_dir():
        if (path / "config.json").is_file():
            config = read_json(path / "config.json")
            if not isinstance(config, dict):
                raise CheckpointError("config.json: expected a JSON object")
        files, weight_map = weight_files(path)
    else:
        files, weight_map = [path], None
    tensors: list[RawTensor] = []
    handles: list[SafetensorsFile] = []
    notes: list[tuple] = []
    seen: dict[str, str] = {}
    for f in files:
        if f.suffix == ".safetensors":
            sf = SafetensorsFile(f)
            handles.append(sf)
            found = sf.tensors()
        else:
            found, more = tensors_from_state_dict(safe_torch_load(f), f.name)
            notes += more
        for t in found:
            if weight_map is not None and weight_map.get(t.key) is not None and resolve_inside(path, weight_map[t.key]) != f.resolve():
                continue  # the index assigns this key to another shard; that copy wins
            if t.key in seen:
                raise UnsafeCheckpointError(f"tensor {t.key!r} appears in both {seen[t.key]} and {f.name}")
            seen[t.key] = f.name
            tensors.append(t)
    if weight_map is not None:
        missing = sorted(k for k in weight_map if k not in seen)
        if missing:
            raise CheckpointError(f"index names {len(missing)} tensors that no shard holds, e.g. {missing[0]!r}")

    def close() -> None:
        for h in handles:
            h.close()

    return RawCheckpoint("merged", path, tensors, files, config=config, notes=notes, close=close)
