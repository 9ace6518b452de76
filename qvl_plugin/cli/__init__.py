"""`qvl-ckpt`: a thin click layer over the library. All rich rendering lives in this package."""

from __future__ import annotations

import os
import sys

import click

from ..errors import QvlError

__all__ = ["main", "QvlGroup"]


class QvlGroup(click.Group):
    """Turns library errors into one line on stderr and exit status 1 (usage errors stay click's 2)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit, KeyboardInterrupt):
            raise
        except QvlError as e:
            _fail(str(e))
        except Exception as e:  # never a traceback for the user; QVL_DEBUG=1 shows it
            if os.environ.get("QVL_DEBUG"):
                raise
            _fail(f"{type(e).__name__}: {e}")


def _fail(message: str) -> None:
    line = " ".join(str(message).split()) or "failed"
    click.echo(f"error: {line}", err=True)
    sys.exit(1)


@click.group(cls=QvlGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qvl-plugin")
def main() -> None:
    """Inspect, diff, audit, merge, convert and extract Qwen-VL LoRA checkpoints."""


def _register() -> None:
    # Each command lives in its own module; a missing module (work in progress) must not break the rest.
    from importlib import import_module

    for mod, names in (
        ("inspect", ["inspect"]),
        ("merge", ["merge", "convert", "extract"]),
        ("diff", ["diff", "audit"]),
        ("recipes", ["recipes"]),
    ):
        try:
            module = import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{mod}":
                raise
            continue
        for name in names:
            cmd = getattr(module, name, None)
            if cmd is not None:
                main.add_command(cmd)


_register()
