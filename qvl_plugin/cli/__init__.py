"""`qvl-ckpt`: a thin click layer over the library. All rich rendering lives in this package."""

from __future__ import annotations

import click

from .guard import QvlGroup

__all__ = ["main", "QvlGroup"]


@click.group(cls=QvlGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qvl-plugin")
def main() -> None:
    """Inspect, diff, audit, merge, convert and extract Qwen-VL LoRA checkpoints."""


from .diff import audit, diff  # noqa: E402  (commands attach to the group defined above)
from .inspect import inspect  # noqa: E402
from .merge import convert, extract, merge  # noqa: E402
from .recipes import recipes  # noqa: E402

for _command in (inspect, diff, audit, merge, convert, extract, recipes):
    main.add_command(_command)
