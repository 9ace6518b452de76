"""The older-transformers venvs: the oldest transformers + PEFT we declare, and the last 4.x (Qwen-VL v1's).

Kept apart from the test so the same pins can be built ahead of a test run (``python -m
tests.external.old_transformers_env``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from tests.external.venv import ensure_venv

# name -> (transformers, peft). "floor" must match pyproject's declared lower bounds.
PINS: dict[str, tuple[str, str]] = {
    "floor": ("4.52.4", "0.15.2"),
    "last-4x": ("4.57.6", "0.21.2"),
}

# What qvl_plugin itself imports besides transformers/peft; the checkout is put on PYTHONPATH, not installed.
_DEPS = ["safetensors>=0.4.3", "accelerate>=1.0,<2", "click>=8.1", "rich>=13", "pyyaml>=6", "pillow>=10"]


def pip_steps(pin: str) -> list[list[str]]:
    tf, peft = PINS[pin]
    return [["torch==2.13.0", f"transformers=={tf}", f"peft=={peft}", *_DEPS]]


def venv_for(pin: str) -> Path:
    return ensure_venv(f"old-transformers-{pin}", pip_steps(pin))


if __name__ == "__main__":
    for name in sys.argv[1:] or PINS:
        print(name, venv_for(name), flush=True)
