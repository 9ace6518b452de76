"""Every command's path arguments go through here: run dirs and hub ids resolved by ``ckpt.sources``, and
what was picked said on stderr (stdout stays clean for ``--json``)."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape

from ..ckpt.adapter_config import load_adapter_config
from ..ckpt.formats import detect_format
from ..ckpt.sources import Source, parse_repo_id, resolve_source
from ..errors import CheckpointError

__all__ = ["download_option", "resolved", "resolve_all", "base_from_adapter", "say"]

err_console = Console(stderr=True, highlight=False, soft_wrap=True)

download_option = click.option(
    "--download", is_flag=True, help="Let hub ids (org/name[@rev]) missing from the local Hugging Face cache be downloaded.")


def say(message: str) -> None:
    err_console.print(f"[dim]{escape(message)}[/dim]")


def resolved(arg: str | None, download: bool = False) -> str | None:
    """The checkpoint path an argument names (None stays None); the resolution is reported on stderr."""
    if arg is None:
        return None
    if not Path(arg).exists() and parse_repo_id(arg) is None:  # a mistyped path is a usage error (exit 2), as before
        raise click.BadParameter(f"{arg}: no such file or directory (nor a hub id org/name[@revision])")
    src: Source = resolve_source(arg, download=download)
    if src.note:
        say(src.note)
    return str(src.path)


def resolve_all(download: bool, *args: str | None) -> list[str | None]:
    return [resolved(a, download) for a in args]


def base_from_adapter(src: str, adapter_config: str | None, download: bool) -> str:
    """A merge without --base: the adapter's ``base_model_name_or_path``, when it resolves (said so)."""
    cfg = adapter_config
    if cfg is None and Path(src).is_dir() and detect_format(Path(src)) == "peft":
        cfg = str(Path(src) / "adapter_config.json")
    name = load_adapter_config(cfg).base_model_name_or_path if cfg else None
    if not name:
        raise click.UsageError("--base is required: the adapter names no base_model_name_or_path")
    try:
        base = resolve_source(name, download=download)
    except CheckpointError as e:
        raise click.UsageError(f"--base not given and the adapter's base_model_name_or_path does not resolve: {e}") from None
    say(f"--base not given: using the adapter's base_model_name_or_path {name}" + (f" ({base.note})" if base.note else ""))
    return str(base.path)
