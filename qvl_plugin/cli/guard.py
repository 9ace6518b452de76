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
    """A click group whose subcommands follow the error contract."""


class QvlCommand(_Guarded, click.Command):
    """A standalone click command (``qvl-train``) following the error contract."""
