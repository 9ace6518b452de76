"""``qvl-ckpt diff`` and ``qvl-ckpt audit``: checkpoint comparison and auditing as CI gates.

Exit codes. diff: 0 equal within --atol, 1 different, 2 trouble (bad arguments, an input that cannot be
read, a comparison that cannot be made), like diff(1) and cmp(1) -- so 1 always means "different".
audit: 0 clean, 1 when an error was found (with --strict, also a warning; an unreadable SRC is an
error finding), 2 bad arguments.
"""

from __future__ import annotations

import json
import math
import os
from typing import TYPE_CHECKING

import click
from rich.markup import escape
from rich.table import Table

from ..ckpt.audit import audit as run_audit
from ..ckpt.audit import audit_ok
from ..ckpt.formats import FORMATS
from ..errors import QvlError
from ..serving import engines as serving_engines

if TYPE_CHECKING:
    from ..ckpt.diff_report import DiffReport
from .guard import fail
from .render import SEVERITY_STYLE, console, print_json
from .sources import download_option, resolve_all

__all__ = ["diff", "audit"]

_PATH = str  # a path, run dir or hub id: resolved by .sources


def _fmt(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "-"
    if math.isnan(x) or math.isinf(x):
        return str(x)
    return f"{x:.2%}" if pct else f"{x:.3g}"


def _shape(s) -> str:
    return "x".join(str(d) for d in s) if s is not None else "-"


@click.command()
@click.argument("a", type=_PATH)
@click.argument("b", type=_PATH)
@click.option("--base", type=_PATH, help="Full base model: compare an adapter with a merged model (or two adapters) by effective weights.")
@click.option("--atol", type=click.FloatRange(min=0), default=0.0, show_default=True, help="Max abs difference still counted as equal.")
@click.option("--top", type=click.IntRange(min=0), default=20, show_default=True, help="Show the N largest changes (0 = all).")
@click.option("--adapter-config", type=click.Path(exists=True, dir_okay=False), help="adapter_config.json for a .pth dump (alpha, patterns).")
@click.option("--lora-alpha", type=float, help="LoRA alpha for a .pth dump without a config.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="With --base: where the LoRA/DoRA products run (auto = cuda when torch sees a GPU, else cpu).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@download_option
@click.pass_context
def diff(ctx: click.Context, a: str, b: str, base: str | None, atol: float, top: int, adapter_config: str | None,
         lora_alpha: float | None, device: str, as_json: bool, download: bool) -> None:
    """What changed from A to B (B is the reference), in canonical names.

    Exit 0 when equal within --atol, 1 when different, 2 on usage or input errors.
    """
    from ..ckpt.diff import diff_checkpoints  # torch: only when diffing

    try:
        a, b, base = resolve_all(download, a, b, base)
        report = diff_checkpoints(a, b, base=base, atol=atol, adapter_config=adapter_config, lora_alpha=lora_alpha, device=device)
    except QvlError as e:
        _trouble(ctx, str(e))
    except Exception as e:  # pragma: no cover - a bug; still "trouble", never "different"
        if os.environ.get("QVL_DEBUG"):
            raise
        _trouble(ctx, f"{type(e).__name__}: {e}")
    if as_json:
        print_json(report.to_dict(top=top or None))
    else:
        _render_diff(report, top)
    ctx.exit(0 if report.equal else 1)


def _trouble(ctx: click.Context, message: str) -> None:
    fail(message, code=2)


def _render_diff(r: "DiffReport", top: int) -> None:
    console.print(f"A: [bold]{escape(r.a)}[/bold]")
    console.print(f"B: [bold]{escape(r.b)}[/bold]" + (f"  (--base {escape(r.base)})" if r.base else ""))
    mode = {"adapter": "adapters by LoRA effect", "tensor": "tensors", "effective": "effective weights (base + adapter)"}[r.mode]
    console.print(f"compared as {mode}, atol {r.atol:g}")
    for n in r.notes:
        console.print(f"[dim]note: {escape(n)}[/dim]")
    changed = r.changed
    groups = [g for g in r.groups() if g.changed]
    if groups:
        t = Table(show_edge=False, header_style="bold", title="by group")
        for col in ("group", "tensors", "changed", "||a-b||", "rel", "max abs"):
            t.add_column(col, justify="left" if col == "group" else "right")
        for g in groups:
            t.add_row(g.label, str(g.rows), str(g.changed), _fmt(g.diff_norm), _fmt(g.rel, pct=True), _fmt(g.max_abs))
        console.print(t)
    values = [x for x in changed if x.status not in ("only_a", "only_b")]
    if values:
        shown = values if not top else values[:top]
        t = Table(show_edge=False, header_style="bold", title=f"largest changes ({len(shown)} of {len(values)})")
        width = min(64, max(len(x.name) for x in shown))
        for col in ("tensor", "kind", "status", "shape", "max abs", "||a-b||", "rel", "note"):
            t.add_column(col, justify="right" if col in ("max abs", "||a-b||", "rel") else "left", min_width=width if col == "tensor" else None,
                         overflow="fold" if col in ("tensor", "note") else "ellipsis", no_wrap=col not in ("tensor", "note"))
        for x in shown:
            shape = _shape(x.shape_a) if x.shape_a == x.shape_b else f"{_shape(x.shape_a)} -> {_shape(x.shape_b)}"
            note = x.note or (f"{x.dtype_a} -> {x.dtype_b}" if x.dtype_a != x.dtype_b else "")
            t.add_row(escape(x.name), x.kind, x.status, shape, _fmt(x.max_abs), _fmt(x.diff_norm), _fmt(x.rel, pct=True), escape(note))
        console.print(t)
    for side, rows in (("A", r.only_a), ("B", r.only_b)):
        if rows:
            console.print(f"[bold]only in {side}[/bold] ({len(rows)}):")
            for x in rows if not top else rows[:top]:
                console.print(f"  {escape(x.name)} [dim]{x.kind} {_shape(x.shape_a if side == 'A' else x.shape_b)}[/dim]")
            if top and len(rows) > top:
                console.print(f"  [dim]... {len(rows) - top} more[/dim]")
    if r.config:
        t = Table(show_edge=False, header_style="bold", title="config.json fields that change behaviour")
        for col in ("field", "A", "B"):
            t.add_column(col)
        for c in r.config:
            t.add_row(c.field, escape(json.dumps(c.a)), escape(json.dumps(c.b)))
        console.print(t)
    if r.equal:
        console.print(f"[green]equal[/green]: {len(r.rows)} tensors within atol {r.atol:g}")
    elif not changed:
        console.print(f"[bold red]different[/bold red]: {len(r.rows)} tensors equal, {len(r.config)} config field(s) differ")
    else:
        extra = f"; {len(r.config)} config field(s) differ" if r.config else ""
        console.print(f"[bold red]different[/bold red]: {len(changed)} of {len(r.rows)} tensors differ{extra}")


@click.command()
@click.argument("src", type=_PATH)
@click.option("--base", type=_PATH, help="Full base model: check shapes, unmatched keys, tied weights and no-op against it.")
@click.option("--strict", is_flag=True, help="Exit 1 on warnings too.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), help="Force the input format instead of detecting it.")
@click.option("--adapter-config", type=click.Path(exists=True, dir_okay=False), help="adapter_config.json for a .pth dump (alpha, patterns).")
@click.option("--lora-alpha", type=float, help="LoRA alpha for a .pth dump without a config.")
@click.option("--serve", type=click.Choice(serving_engines()), help="Also check what this serving engine refuses, ignores or limits.")
@click.option("--json", "as_json", is_flag=True, help='Print {"findings": [...], "ok": bool}.')
@download_option
@click.pass_context
def audit(ctx: click.Context, src: str, base: str | None, strict: bool, fmt: str | None, adapter_config: str | None,
          lora_alpha: float | None, serve: str | None, as_json: bool, download: bool) -> None:
    """Will SRC load and do what was trained? Findings with stable codes.

    Exit 1 when an error was found (with --strict, a warning too), 0 otherwise, 2 on usage errors.
    """
    src, base = resolve_all(download, src, base)
    findings = run_audit(src, base=base, adapter_config=adapter_config, lora_alpha=lora_alpha, format=fmt, serve=serve)
    ok = audit_ok(findings, strict=strict)
    if as_json:
        print_json({"findings": [f.to_dict() for f in findings], "ok": ok})
    else:
        console.print(f"[bold]{escape(src)}[/bold]" + (f"  (--base {escape(base)})" if base else ""))
        for f in findings:
            style = SEVERITY_STYLE.get(f.severity, "")
            console.print(f"[{style}]{f.severity}[/{style}] {f.code}: {escape(f.message)}")
            if f.keys:
                more = f" (+{len(f.keys) - 3} more)" if len(f.keys) > 3 else ""
                console.print(f"  [dim]{escape(', '.join(f.keys[:3]))}{more}[/dim]")
        counts = {s: sum(f.severity == s for f in findings) for s in ("error", "warning", "info")}
        summary = ", ".join(f"{n} {s}{'s' if n != 1 else ''}" for s, n in counts.items())
        console.print(("[green]ok[/green]" if ok else "[bold red]failed[/bold red]") + f": {summary}" + (" (strict)" if strict else ""))
    ctx.exit(0 if ok else 1)
