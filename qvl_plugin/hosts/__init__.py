"""Host-trainer integration: the HF ``Trainer`` callback, the gather-aware saver, the ``qvl-train`` runner,
the embedded tiny Qwen2-VL and its synthetic data.

    from qvl_plugin.hosts import QvlSaveCallback, save_outputs
    trainer = Trainer(model=apply_recipe(model, recipe), ..., callbacks=[QvlSaveCallback(recipe, base_path=base)])

Imports are lazy: ``import qvl_plugin.hosts`` does not import transformers.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = [
    "QvlSaveCallback",
    "save_outputs",
    "gather_trainable_state_dict",
    "EmptyTensorError",
    "SavedOutputs",
    "load_train_config",
    "run_training",
    "TrainConfig",
    "TrainConfigError",
    "TrainResult",
    "build_tiny_model",
    "load_processor",
    "tiny_dir",
    "SyntheticCaptions",
    "JsonCaptions",
    "QwenVLCollator",
]

_HOME = {
    "QvlSaveCallback": "callback",
    "save_outputs": "saving",
    "gather_trainable_state_dict": "saving",
    "EmptyTensorError": "saving",
    "SavedOutputs": "saving",
    "load_train_config": "config",
    "run_training": "runner",
    "TrainConfig": "config",
    "TrainConfigError": "config",
    "TrainResult": "runner",
    "build_tiny_model": "tiny",
    "load_processor": "tiny",
    "tiny_dir": "tiny",
    "SyntheticCaptions": "data",
    "JsonCaptions": "data",
    "QwenVLCollator": "data",
}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(import_module(f"{__name__}.{_HOME[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
