"""`qvl-ckpt`: a thin click layer over the library. All rich rendering lives in this package."""

from __future__ import annotations

import click

from .guard import QvlGroup

__all__ = ["main", "QvlGroup", "COMMANDS"]


#: command -> "module:attribute" in this package, imported only when that command runs
COMMANDS = {
    "inspect": "inspect:inspect",
    "ls": "ls:ls",
    "diff": "diff:diff",
    "audit": "diff:audit",
    "merge": "merge:merge",
    "convert": "merge:convert",
    "extract": "merge:extract",
    "recipes": "recipes:recipes",
    "recover": "recover:recover",
}


@click.group(cls=QvlGroup, lazy=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qvl-plugin")
def main() -> None:
    """Inspect, diff, audit, merge, convert and extract Qwen-VL LoRA checkpoints."""
