"""``qvl-ckpt inspect``: what is in this checkpoint (headers only)."""

from __future__ import annotations

import click
from rich.markup import escape
from rich.table import Table

from ..ckpt.formats import FORMATS
from ..ckpt.inspect import summarize
from ..ckpt.view import open_checkpoint
from .render import SEVERITY_STYLE, console, human_bytes, print_json
from .sources import download_option, resolved

__all__ = ["inspect"]

_GROUP_TITLES = {"embedding": "embedding", "head": "head", "language": "language layers", "vision": "vision tower", "merger": "merger / projector", "other": "other"}


@click.command()
@click.argument("path", type=click.Path(path_type=str))
@click.option("--format", "fmt", type=click.Choice(FORMATS), help="Force the input format instead of detecting it.")
@click.option("--adapter-config", type=click.Path(dir_okay=False), help="adapter_config.json for a .pth dump (alpha, patterns).")
@click.option("--lora-alpha", type=float, help="LoRA alpha for a .pth dump without a config.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@download_option
def inspect(path: str, fmt: str | None, adapter_config: str | None, lora_alpha: float | None, as_json: bool, download: bool) -> None:
    """Show format, layout, LoRA settings, modules_to_save, sizes and findings of PATH (file, dir, run dir, hub id)."""
    path = resolved(path, download)
    with open_checkpoint(path, format=fmt, adapter_config=adapter_config, lora_alpha=lora_alpha) as ckpt:
        info = summarize(ckpt)
    if as_json:
        print_json(info)
        return
    _render(info)


def _render(info: dict) -> None:
    console.print(f"[bold]{escape(info['path'])}[/bold]")
    console.print(
        f"format [bold]{info['format']}[/bold]  layout [bold]{info['layout']}[/bold]  "
        f"{info['num_tensors']} tensors  {human_bytes(info['total_bytes'])}  "
        + " ".join(f"{k}×{v}" for k, v in info["dtypes"].items())
    )
    if info["base_model"]:
        console.print(f"base model: {escape(str(info['base_model']))}")
    if info["tie_word_embeddings"] is not None:
        console.print(f"tie_word_embeddings: {info['tie_word_embeddings']}")
    lora = info["lora"]
    if lora:
        rank = lora["rank"] if isinstance(lora["rank"], int) else f"per module ({min(lora['rank'].values())}..{max(lora['rank'].values())})"
        scaling = lora["scaling"] if not isinstance(lora["scaling"], dict) else "per module"
        flags = [f for f, on in (("DoRA", lora["use_dora"]), ("rsLoRA", lora["use_rslora"])) if on]
        console.print(
            f"LoRA: r={rank} alpha={lora['alpha'] if lora['alpha'] is not None else 'unknown'} scaling={scaling if scaling is not None else 'unknown'} "
            f"on {lora['num_targeted']} {'modules/parameters' if lora.get('target_parameters') else 'modules'} ({escape(', '.join(lora['target_modules'] + lora.get('target_parameters', [])))})"
            + (f" [{', '.join(flags)}]" if flags else "")
        )
        if lora.get("target_parameters"):
            experts = f", {lora['num_experts']} experts (lora_A holds r·E rows)" if lora.get("num_experts") else ""
            console.print(f"target_parameters (PEFT ParamWrapper): {escape(', '.join(lora['target_parameters']))}{experts}")
    if info["modules_to_save"]:
        console.print("modules_to_save: " + escape(", ".join(info["modules_to_save"])))
    if info["trainable_token_indices"]:
        for m, ids in info["trainable_token_indices"].items():
            console.print(f"trainable token rows in {escape(m)}: {ids if ids is not None else 'indices unknown (no config)'}")
    table = Table(title=None, show_edge=False, header_style="bold")
    for col in ("group", "tensors", "size", "modules", "layers", "roles"):
        table.add_column(col, justify="right" if col in ("tensors", "size", "modules") else "left")
    for name, g in info["groups"].items():
        layers = g["layers"]
        span = f"{layers[0]}..{layers[-1]} ({len(layers)})" if layers else ""
        roles = ", ".join(f"{k} {v}" for k, v in g["roles"].items())
        table.add_row(_GROUP_TITLES.get(name, name), str(g["tensors"]), human_bytes(g["bytes"]), str(g["modules"]), span, roles)
    console.print(table)
    for f in info["findings"]:
        style = SEVERITY_STYLE.get(f["severity"], "")
        console.print(f"[{style}]{f['severity']}[/{style}] {escape(f['code'])}: {escape(f['message'])}")
