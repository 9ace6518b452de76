"""The differences between the transformers and PEFT versions we support (transformers 4.52.4 to 5.x, PEFT
0.15.2 to 0.21, all tested), answered in one place so no module guesses a version on its own."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["version_at_least", "dtype_kwarg"]


def version_at_least(package: str, *release: int) -> bool:
    """Is the installed ``package`` (``transformers``, ``peft``) at least ``release`` (e.g. ``4, 56``)?"""
    from packaging.version import Version

    return Version(importlib.import_module(package).__version__).release >= release


def dtype_kwarg(value: Any) -> dict[str, Any]:
    """``{"dtype": value}`` for ``from_pretrained``/``from_config``; ``torch_dtype`` before transformers 4.56,
    which has no ``dtype`` (4.52-4.55 hand an unknown ``dtype`` to the model's ``__init__``: TypeError)."""
    return {"dtype" if version_at_least("transformers", 4, 56) else "torch_dtype": value}
