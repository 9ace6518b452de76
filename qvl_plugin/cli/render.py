"""Shared rich helpers for the CLI: one console on stdout, sizes in human units."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console

from ..units import human_bytes

__all__ = ["console", "human_bytes", "print_json", "SEVERITY_STYLE"]

console = Console(highlight=False, soft_wrap=False)
SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
