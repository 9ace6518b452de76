"""``qvl-ckpt merge``, ``convert`` and ``extract``: thin click layers over ``qvl_plugin.ckpt``."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterator

import click
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ..errors import UsageError
from ..serving import engines as serving_engines
from .render import console, human_bytes, print_json
from .sources import base_from_adapter, download_option, resolve_all, resolved

__all__ = ["merge", "convert", "extract"]

_DTYPES = click.Choice(["auto", "bf16", "fp16", "fp32"])
_DEVICE_HELP = "Where the LoRA/DoRA products run: auto = cuda when torch sees a GPU, else cpu."


def _device_option(help_text: str = _DEVICE_HELP):
    return click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True, help=help_text)


@contextlib.contextmanager
def _progress(label: str, enabled: bool, unit_bytes: bool = True) -> Iterator[Callable[[int, int], None] | None]:
    """A rich progress bar on a terminal; nothing otherwise (pipes, CI, --json)."""
    if not enabled or not console.is_terminal:
        yield None
        return
    columns = [TextColumn(label), BarColumn(), DownloadColumn() if unit_bytes else TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


@click.command()
@click.argument("src", type=str)
@click.option("--base", type=str, help="Base model (dir, run dir or hub id); default: the adapter's base_model_name_or_path when it resolves.")
@click.option("-o", "--out", required=True, type=click.Path(path_type=str), help="Output model dir (must not exist, see --force).")
@click.option("--adapter-config", type=click.Path(exists=True, dir_okay=False), help="adapter_config.json for a .pth dump (alpha, patterns, rsLoRA).")
@click.option("--lora-alpha", type=float, help="LoRA alpha for a .pth dump without a config (never guessed).")
@click.option("--dtype", type=_DTYPES, default="auto", show_default=True, help="Output dtype; auto keeps the base's.")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest shard, e.g. 5GB, 500MB.")
@click.option("--force", is_flag=True, help="Replace an existing OUT (atomically).")
@click.option("--checksum", is_flag=True, help="Also write a SHA256SUMS manifest into OUT.")
@click.option("--serve", type=click.Choice(serving_engines()),
              help="Partial merge for this engine: OUT/base gets only what it cannot serve, OUT/adapter the LoRA it can.")
@_device_option(_DEVICE_HELP + " Bit-identical to PEFT on cpu; on cuda within 1 ulp of the output dtype.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@click.option("--direct-io/--page-cache", default=True, show_default=True,
              help="Write the weights past the page cache (O_DIRECT) where the filesystem allows, or through it.")
@download_option
def merge(src, base, out, adapter_config, lora_alpha, dtype, max_shard_size, force, checksum, serve, device, as_json, direct_io, download) -> None:
    """Merge the adapter SRC (PEFT dir, .pth dump, run dir or hub id) into --base and write a plain HF model dir to -o.

    Everything is validated before the first byte is written; tensors stream one at a time.
    """
    from ..ckpt.devices import resolve_device  # torch: only when this command runs

    dev = resolve_device(device)  # `--device cuda` without a GPU: one error line before anything else
    src = resolved(src, download)
    base = resolved(base, download) if base is not None else base_from_adapter(src, adapter_config, download)
    if serve is not None:
        if checksum:
            raise UsageError("--checksum is not supported with --serve")
        _partial(src, base, out, adapter_config, lora_alpha, dtype, max_shard_size, force, serve, as_json, direct_io)
        return
    from ..ckpt.merge import merge as merge_api  # torch: only when this command runs

    with _progress("merging", not as_json) as progress:
        report = merge_api(src, base, out, adapter_config=adapter_config, lora_alpha=lora_alpha, dtype=dtype,
                           max_shard_size=max_shard_size, force=force, progress=progress, checksum=checksum, device=dev,
                           direct_io=direct_io)
    if as_json:
        print_json(report.to_dict())
        return
    c = report.counts
    console.print(
        f"merged [bold]{report.src}[/bold] into [bold]{report.base}[/bold] -> [bold green]{report.out}[/bold green]"
    )
    console.print(
        f"{c['tensors']} tensors: {c['lora']} LoRA, {c['dora']} DoRA, {c['replaced']} replaced, {c['token_rows']} with token rows, "
        f"{c['bias_lora']} lora_bias, {c['unchanged']} unchanged; {len(report.files)} file(s), {human_bytes(report.bytes_written)}"
    )
    s = report.seconds
    console.print(
        f"time {s['total']:.2f}s (plan {s['plan']:.2f}, read {s['read']:.2f}, math {s['math']:.2f}, write {s['write']:.2f}, "
        f"copy {s['copy']:.2f}, " + (f"waiting for writes {s.get('wait', 0):.2f}, " if report.writer_thread else "")
        + f"verify+rename {s['commit']:.2f}" + ("; write and copy ran beside read and math" if report.writer_thread else "")
        + f") on {report.device}" + (", weights past the page cache (O_DIRECT)" if report.direct_io else "")
    )
    if report.copied_files:
        console.print("copied: " + ", ".join(report.copied_files))
    for note in report.notes:
        console.print(f"[yellow]note[/yellow] {note}")
    if report.skipped:
        console.print("[yellow]not copied[/yellow] (sub-directories): " + ", ".join(report.skipped))


def _partial(src, base, out, adapter_config, lora_alpha, dtype, max_shard_size, force, serve, as_json, direct_io) -> None:
    from ..ckpt.partial_merge import partial_merge  # torch: only when this command runs

    with _progress("merging", not as_json) as progress:
        r = partial_merge(src, base, out, engine=serve, adapter_config=adapter_config, lora_alpha=lora_alpha, dtype=dtype,
                          max_shard_size=max_shard_size, force=force, progress=progress, direct_io=direct_io)
    if as_json:
        print_json(r.to_dict())
        return
    console.print(f"partial merge for [bold]{serve}[/bold] -> [bold green]{r.out}[/bold green]")
    console.print(f"base: {len(r.baked)} adapter tensors baked ({', '.join(r.rules) or 'nothing the engine refuses'})")
    if r.adapter is not None:
        console.print(f"adapter: {len(r.kept)} LoRA tensors in {r.adapter}")
    for note in r.notes:
        console.print(f"[yellow]note[/yellow] {note}")


@click.command()
@click.argument("src", type=str)
@click.option("--to", "to", required=True, type=click.Choice(["peft", "pth"]), help="Target format.")
@click.option("-o", "--out", required=True, type=click.Path(path_type=str), help="Output: a dir for peft, a .pth file for pth.")
@click.option("--base", type=str, help="Base model (dir or hub id): base_model_name_or_path, and a load check for --to pth.")
@click.option("--adapter-config", type=click.Path(exists=True, dir_okay=False), help="adapter_config.json of the run (pth -> peft).")
@click.option("--lora-alpha", type=float, help="LoRA alpha for a .pth dump without a config (never guessed).")
@click.option("--force", is_flag=True, help="Replace an existing OUT (atomically).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@download_option
def convert(src, to, out, base, adapter_config, lora_alpha, force, as_json, download) -> None:
    """Convert SRC between a .pth dump and a PEFT adapter dir (bit-exact both ways)."""
    from ..ckpt.convert import convert as convert_api  # torch: only when this command runs

    base_name = base
    src, base = resolve_all(download, src, base)
    if base_name is not None and Path(base_name).exists():
        base_name = base  # a local path (or run dir): the resolved checkpoint; a hub id stays the id
    report = convert_api(src, to, out, base=base, base_name=base_name, adapter_config=adapter_config, lora_alpha=lora_alpha, force=force)
    if as_json:
        print_json(report.to_dict())
        return
    console.print(f"wrote [bold green]{report.out}[/bold green] ({report.to}, {report.tensors} tensors)")
    if report.load is not None:
        if "skipped" in report.load:
            console.print(f"[yellow]load check skipped[/yellow]: {report.load['skipped']}")
        else:
            u, m = report.load["unexpected"], report.load["missing_adapter"]
            style = "green" if not u and not m else "red"
            console.print(f"[{style}]load_state_dict(strict=False) into get_peft_model(base): {len(u)} unexpected, {len(m)} adapter keys missing[/{style}]")
            for k in (u + m)[:10]:
                console.print(f"  {k}")
    for note in report.notes:
        console.print(f"[yellow]note[/yellow] {note}")


def _rank(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        r = int(value)
    except ValueError:
        raise click.BadParameter("a positive number or 'auto'") from None
    if r < 1:
        raise click.BadParameter("a positive number or 'auto'")
    return r


@click.command()
@click.argument("merged", type=str)
@click.option("--base", required=True, type=str, help="The base MERGED was made from (dir or hub id).")
@click.option("-o", "--out", required=True, type=click.Path(path_type=str), help="Output PEFT adapter dir.")
@click.option("--rank", default="16", show_default=True, callback=lambda ctx, p, v: _rank(v), help="LoRA rank, or auto (see --energy).")
@click.option("--energy", type=click.FloatRange(0, 1, min_open=True), default=0.99, show_default=True, help="With --rank auto: keep this share of Σσ².")
@click.option("--max-rank", type=click.IntRange(min=1), help="Cap every rank; with --rank auto it also allows the randomized SVD.")
@click.option("--sv-epsilon", type=click.FloatRange(min=0), default=0.0, show_default=True, help="Drop singular values <= this (absolute).")
@click.option("--include", metavar="REGEX", help="Only modules whose name matches (re.search).")
@click.option("--exclude", metavar="REGEX", help="Leave out modules whose name matches (re.search).")
@click.option("--svd", type=click.Choice(["auto", "exact", "lowrank"]), default="auto", show_default=True,
              help="auto: randomized truncated SVD (torch.svd_lowrank) for large matrices with a known rank bound, else exact.")
@_device_option("Where the SVDs run: auto = cuda when torch sees a GPU, else cpu.")
@click.option("--force", is_flag=True, help="Replace an existing OUT (atomically).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@download_option
def extract(merged, base, out, rank, energy, max_rank, sv_epsilon, include, exclude, svd, device, force, as_json, download) -> None:
    """Extract MERGED - BASE as a PEFT adapter: truncated SVD per changed Linear, the rest as modules_to_save."""
    from ..ckpt.devices import resolve_device  # torch: only when this command runs
    from ..ckpt.extract import extract as extract_api

    dev = resolve_device(device)
    merged, base = resolve_all(download, merged, base)
    with _progress("extracting", not as_json, unit_bytes=False) as progress:
        report = extract_api(merged, base, out, rank=rank, energy=energy, max_rank=max_rank, sv_epsilon=sv_epsilon, include=include,
                             exclude=exclude, svd=svd, device=dev, force=force, progress=progress)
    if as_json:
        print_json(report.to_dict())
        return
    table = Table(show_edge=False, header_style="bold")
    for col in ("module", "stored as", "rank", "rel. error", "svd"):
        table.add_column(col, justify="left" if col in ("module", "stored as", "svd") else "right")
    for m in report.modules:
        table.add_row(m.module, m.kind, str(m.rank or ""), f"{m.rel_error:.2e}" if m.kind == "lora" else "exact", m.svd or "")
    console.print(table)
    console.print(
        f"wrote [bold green]{report.out}[/bold green]: {sum(m.kind == 'lora' for m in report.modules)} LoRA, "
        f"{sum(m.kind != 'lora' for m in report.modules)} full/bias, {report.unchanged} tensors unchanged; "
        f"max relative error {report.max_rel_error:.2e}; {report.seconds.get('total', 0):.2f}s (SVD {report.seconds.get('svd', 0):.2f}s on {report.device})"
    )
    for note in report.notes:
        console.print(f"[yellow]note[/yellow] {note}")
