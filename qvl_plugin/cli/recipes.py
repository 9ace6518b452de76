"""`qvl-ckpt recipes`: list the installed recipes, show one, dry-run one on a model directory."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..recipes import Recipe, RecipeError, get_recipe, list_recipes, load_recipe_file

__all__ = ["recipes"]


def _emit(obj) -> None:
    click.echo(json.dumps(obj, indent=2))


def _resolve(spec: str, sets: tuple[str, ...]) -> Recipe:
    """A registered name, or a YAML/JSON file; then ``--set key=value`` overrides (values parsed as YAML)."""
    import yaml

    p = Path(spec)
    recipe = load_recipe_file(p) if (p.suffix in (".yaml", ".yml", ".json") or p.is_file()) else get_recipe(spec)
    changes = {}
    for item in sets:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--set")
        try:
            changes[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise RecipeError(f"--set {item}: value is not valid YAML ({' '.join(str(e).split())})") from None
    return recipe.with_overrides(**changes) if changes else recipe


def _list(as_json: bool) -> None:
    infos = list_recipes()
    if as_json:
        _emit({"recipes": [info.__dict__ for info in infos]})
        return
    table = Table(title="qvl_plugin recipes", title_justify="left")
    for col in ("name", "family", "description", "from"):
        table.add_column(col, no_wrap=col != "description", overflow="fold")
    for info in infos:
        table.add_row(*map(escape, (info.name, info.family, info.description, f"{info.distribution}:{info.entry_point}")))
    Console().print(table)


@click.group("recipes", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of a table.")
@click.pass_context
def recipes(ctx: click.Context, as_json: bool) -> None:
    """Fine-tuning recipes (LoRA + modules_to_save) from installed plugins; without a command: list them."""
    if ctx.invoked_subcommand is None:
        _list(as_json)


@recipes.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of a table.")
def list_cmd(as_json: bool) -> None:
    """List name, family, description and the distribution each recipe came from."""
    _list(as_json)


@recipes.command("show")
@click.argument("recipe")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a field (YAML value); repeatable.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def show_cmd(recipe: str, sets: tuple[str, ...], as_json: bool) -> None:
    """Show every field of RECIPE (a registered name or a YAML file)."""
    data = _resolve(recipe, sets).to_dict()
    if as_json:
        _emit(data)
        return
    table = Table(show_header=False, box=None)
    for key, value in data.items():
        table.add_row(f"[bold]{key}[/]", escape(json.dumps(value) if not isinstance(value, str) else value))
    Console().print(table)


@recipes.command("check")
@click.argument("recipe")
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Model directory: config.json (weights are read only for Qwen-VL v1: key names and shapes).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a field (YAML value); repeatable.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of tables.")
def check_cmd(recipe: str, model_dir: Path, sets: tuple[str, ...], as_json: bool) -> None:
    """Dry-run RECIPE on MODEL_DIR: matched modules, trainable parameters by group, saved sizes.

    Builds the model on the meta device from config.json (no weights read), so it takes seconds at any size.
    """
    from ..recipes.check import check_recipe
    from ..units import human_bytes

    report = check_recipe(_resolve(recipe, sets), model_dir)
    if as_json:
        _emit(report.to_dict())
        return
    console = Console()
    console.print(f"[bold]{escape(report.recipe.name)}[/] on {escape(report.model)}  ({report.family}, {report.dtype}, "
                  f"{'tied' if report.tied else 'untied'} embeddings, {report.method})")
    matches = Table(title="matched modules", title_justify="left")
    for col in ("kind", "pattern", "modules", "e.g."):
        matches.add_column(col, overflow="fold")
    for m in report.matches:
        matches.add_row(m.kind, escape(m.pattern), str(len(m.modules)), escape(m.modules[0]) if m.modules else "")
    console.print(matches)
    groups = Table(title="trainable parameters", title_justify="left")
    for col in ("group", "trainable", "of", "%", "tensors", "size"):
        groups.add_column(col, justify="left" if col == "group" else "right")
    for r in report.rows:
        groups.add_row(r.group, f"{r.trainable:,}", f"{r.total:,}", f"{r.percent:.2f}", str(r.tensors), human_bytes(r.nbytes))
    total_pct = 100.0 * report.trainable / report.total if report.total else 0.0
    groups.add_row("[bold]total[/]", f"{report.trainable:,}", f"{report.total:,}", f"{total_pct:.2f}", "", "")
    console.print(groups)
    console.print(f"saved adapter (PEFT): [bold]{human_bytes(report.adapter_bytes)}[/]   "
                  f".pth dump: [bold]{human_bytes(report.pth_bytes)}[/]   formats: {', '.join(report.recipe.save)}")
    for s in report.suggestions:
        console.print(f"[yellow]suggestion:[/] {escape(s)}")


@recipes.command("export")
@click.argument("recipe")
@click.option("--host", required=True, type=click.Choice(["llamafactory", "swift", "axolotl", "peft"]),
              help="The trainer whose configuration to write.")
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Model directory to resolve module names on (default: the family's default-size model).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a field (YAML value); repeatable.")
@click.option("--format", "fmt", type=click.Choice(["yaml", "json", "shell"]),
              help="Output format (llamafactory: yaml|json, swift: shell|yaml|json, axolotl: yaml|json, peft: json).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write to FILE (atomically) instead of stdout.")
@click.option("--force", is_flag=True, help="Replace an existing output file.")
@click.option("--allow-approximate", is_flag=True, help="Write the export even where the host differs from the recipe.")
def export_cmd(recipe: str, host: str, model_dir: Path | None, sets: tuple[str, ...], fmt: str | None, output: Path | None,
               force: bool, allow_approximate: bool) -> None:
    """Write RECIPE as HOST's own configuration (LLaMA-Factory YAML, ms-swift arguments, axolotl YAML, PEFT LoraConfig JSON).

    Module names are resolved on MODEL_DIR and each host's matching rules are replayed on them. Whatever the
    host cannot express exactly is printed (one line per difference) and nothing is written, exit 1,
    unless --allow-approximate.
    """
    from ..recipes.export import export_recipe, model_index

    resolved = _resolve(recipe, sets)
    index = model_index(model_dir) if model_dir is not None else None
    result = export_recipe(resolved, host, index, checked_on=str(model_dir) if model_dir is not None else None)
    text = result.render(fmt)
    for line in result.differences:
        click.echo(f"{'warning' if allow_approximate else 'difference'}: {line}", err=True)
    if result.differences and not allow_approximate:
        raise RecipeError(f"recipe {resolved.name} cannot be exported exactly to {host} ({len(result.differences)} "
                          "difference(s) above); nothing written (--allow-approximate writes it anyway)")
    if output is None:
        click.echo(text, nl=False)
        return
    from ..ckpt.outputs import atomic_file

    inputs = [model_dir] if model_dir is not None else []
    with atomic_file(output, inputs, force) as tmp:
        tmp.write_text(text)
