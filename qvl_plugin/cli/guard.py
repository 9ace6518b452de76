"""The CLI's error contract in one place: library errors become one ``error: ...`` line and exit 1;
click usage errors keep exit 2; nothing else ever shows a traceback (``QVL_DEBUG=1`` does)."""

from __future__ import annotations

import os
import sys

import click

from ..errors import QvlError

__all__ = ["QvlGroup", "QvlCommand", "fail"]


def fail(message: str, code: int = 1) -> None:
    line = " ".join(str(message).split()) or "failed"
    click.echo(f"error: {line}", err=True)
    sys.exit(code)


class _Guarded:
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)  # type: ignore[misc]
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit, KeyboardInterrupt):
            raise
        except QvlError as e:
            fail(str(e))
        except Exception as e:
            if os.environ.get("QVL_DEBUG"):
                raise
            fail(f"{type(e).__name__}: {e}")


class QvlGroup(_Guarded, click.Group):
    """A click group whose subcommands follow the error contract.

    ``lazy`` maps a command name to ``"module:attribute"`` (relative to ``qvl_plugin.cli``): the module is
    imported only when that command runs, so ``qvl-ckpt inspect`` never pays for torch or peft.
    """

    def __init__(self, *args, lazy: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self.lazy))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.commands and name in self.lazy:
            import importlib

            module, _, attr = self.lazy[name].partition(":")
            self.add_command(getattr(importlib.import_module(f"qvl_plugin.cli.{module}"), attr), name)
        return super().get_command(ctx, name)


class QvlCommand(_Guarded, click.Command):
    """A standalone click command (``qvl-train``) following the error contract."""
