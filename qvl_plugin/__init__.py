"""qvl_plugin: LoRA + modules_to_save recipes and checkpoint tooling for Qwen vision-language models.

The public API, loaded lazily so ``import qvl_plugin`` stays cheap (torch/peft load on first use)::

    from qvl_plugin import open_checkpoint, merge, audit, get_recipe, apply_recipe
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .errors import AdapterConfigError, CheckpointError, QvlError, UnsafeCheckpointError, UsageError

__version__ = "0.1.0"

_LAZY = {
    "open_checkpoint": "qvl_plugin.ckpt.view",
    "Checkpoint": "qvl_plugin.ckpt.view",
    "Entry": "qvl_plugin.ckpt.view",
    "Finding": "qvl_plugin.ckpt.view",
    "Role": "qvl_plugin.ckpt.view",
    "summarize": "qvl_plugin.ckpt.inspect",
    "merge": "qvl_plugin.ckpt.merge",
    "plan_merge": "qvl_plugin.ckpt.merge_plan",
    "convert": "qvl_plugin.ckpt.convert",
    "extract": "qvl_plugin.ckpt.extract",
    "diff_checkpoints": "qvl_plugin.ckpt.diff",
    "audit": "qvl_plugin.ckpt.audit",
    "Layout": "qvl_plugin.layouts",
    "detect_layout": "qvl_plugin.layouts",
    "get_layout": "qvl_plugin.layouts",
    "Recipe": "qvl_plugin.recipes",
    "RecipeError": "qvl_plugin.recipes",
    "get_recipe": "qvl_plugin.recipes",
    "list_recipes": "qvl_plugin.recipes",
    "load_recipe_file": "qvl_plugin.recipes",
    "apply_recipe": "qvl_plugin.recipes",
    "check_recipe": "qvl_plugin.recipes",
    "QvlSaveCallback": "qvl_plugin.hosts",
}

__all__ = sorted([*_LAZY, "QvlError", "CheckpointError", "UnsafeCheckpointError", "AdapterConfigError", "UsageError", "__version__"])


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
