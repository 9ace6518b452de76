"""``qvl-ckpt ls RUN_DIR``: every checkpoint of a trainer run, newest first, with its health."""

from __future__ import annotations

import click
from rich.markup import escape
from rich.table import Table

from ..ckpt.run_dir import list_checkpoints
from ..errors import CheckpointError
from .render import console, human_bytes, print_json
from .sources import download_option, say

__all__ = ["ls"]


@click.command(name="ls")
@click.argument("run_dir", type=str)
@click.option("--nan", "nan", is_flag=True, help="Also read every tensor and report NaN/Inf (slower).")
@click.option("--json", "as_json", is_flag=True, help='Print {"run_dir": ..., "checkpoints": [...], "newest_complete": ...}.')
@download_option
def ls(run_dir: str, nan: bool, as_json: bool, download: bool) -> None:
    """List the checkpoints of RUN_DIR (HF Trainer, LLaMA-Factory, ms-swift output; or a hub id) with step,
    format, size and health (missing or truncated files, empty ZeRO-3 tensors, NaN with --nan)."""
    from pathlib import Path

    path = Path(run_dir)
    if not path.exists():  # a hub id: its snapshot, listed as a run dir (no newest-checkpoint pick here)
        from ..ckpt.sources import hub_snapshot, parse_repo_id

        parsed = parse_repo_id(run_dir)
        if parsed is None:
            raise CheckpointError(f"{run_dir}: no such file or directory")
        path = hub_snapshot(*parsed, download)
        say(f"{run_dir}: Hugging Face cache snapshot {path.name[:12]}")
    if not path.is_dir():
        raise CheckpointError(f"{run_dir}: not a directory")
    infos = list_checkpoints(path, nan=nan)
    if not infos:
        raise CheckpointError(f"{run_dir}: no checkpoint-N directories (not a trainer output dir)")
    newest = next((i for i in infos if i.kind == "checkpoint" and i.complete), None)
    if as_json:
        print_json({"run_dir": str(path), "checkpoints": [i.to_dict() for i in infos],
                    "newest_complete": newest.name if newest else None, "nan_checked": nan})
        return
    t = Table(show_edge=False, header_style="bold")
    for col in ("checkpoint", "kind", "step", "format", "tensors", "size", "health"):
        t.add_column(col, justify="right" if col in ("step", "tensors", "size") else "left")
    for i in infos:
        name = i.name + (" -> last-checkpoint" if i.last else "") + (" *" if i is newest else "")
        health = "[green]ok[/green]" if i.complete else "[red]" + escape("; ".join(i.problems) or "not a checkpoint") + "[/red]"
        t.add_row(escape(name), i.kind, "" if i.step is None else str(i.step), i.format or "-", str(i.tensors), human_bytes(i.bytes), health)
    console.print(t)
    console.print(f"* newest complete checkpoint: {newest.name}" if newest else "[red]no complete checkpoint[/red]")
    if not nan:
        console.print("[dim]NaN/Inf not checked (pass --nan)[/dim]")
