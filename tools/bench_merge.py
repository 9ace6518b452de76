"""Benchmark: qvl-ckpt merge vs the PEFT merge path vs a plain copy, at three model sizes, plus a projection.

    python tools/bench_merge.py --workdir /tmp/qvl-bench --repeat 3   # ~0.9, ~1.7 and ~3.9 GB

Builds a synthetic Qwen2-VL-shaped bf16 checkpoint with the real 2B widths (hidden 1536, MLP 8960, vocab
151936, tied embeddings, vision width 1280) and fewer layers, plus an r=64 ``all-linear`` adapter with
modules_to_save embed_tokens + lm_head made by PEFT. Then measures, each in its own process (wall time,
peak RSS from ``wait4``):

  (a) ``qvl-ckpt merge ADAPTER --base BASE -o OUT``
  (b) the PEFT path: from_pretrained, PeftModel.from_pretrained, merge_and_unload, save_pretrained
  (c) ``cp -r BASE OUT`` (the I/O floor)
  (a') (a) with the other writer mode (``QVL_MERGE_WRITER``: the writer thread -- used with direct I/O, or
      from 4 cores up -- or inline), paired with (a)
  (d) the LoRA products alone: every ``B @ A`` of the adapter in fp32, in the merge's row chunks, timed in
      process (no reads, no writes, no start-up); (c) + (d) is the floor a merge can approach.
  (d') the same products as a whole process (interpreter + ``import torch`` + reading the LoRA factors +
      the products): what any torch-based merge pays before its first byte of output; (c) + (d') is the
      floor for a process, which is what (a) is.

Runs are paired: each repetition runs every measurement once, in rotating order; medians are reported.
The largest size skips (b) (``--peft-max-layers``; PEFT holds the whole model in memory). (a)'s time is
fitted linearly in base bytes and extrapolated to Qwen2-VL-7B / 72B sizes -- an extrapolation, printed as one.

The page cache is warmed before each run (every run reads warm files) and outputs are synced and
deleted after. (a)'s own report splits its time into read / LoRA math / write / kernel copy. The
outputs of (a) and (b) are compared tensor by tensor (bitwise). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HIDDEN, MLP, VOCAB, HEADS, KV_HEADS = 1536, 8960, 151936, 12, 2
VISION = dict(depth=2, embed_dim=1280, hidden_size=HIDDEN, num_heads=16, mlp_ratio=4, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------------------
# children (each runs in its own process)


def _config(layers: int):
    from transformers import Qwen2VLConfig

    text = dict(hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=layers, num_attention_heads=HEADS,
                num_key_value_heads=KV_HEADS, vocab_size=VOCAB, tie_word_embeddings=True, max_position_embeddings=32768,
                rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
    return Qwen2VLConfig(text_config=text, vision_config=VISION, tie_word_embeddings=True,
                         image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)


def child_build(layers: int, out: Path) -> None:
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    cfg = _config(layers)
    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration._from_config(cfg, dtype=torch.bfloat16)
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_q" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(0.02).to(p.dtype))
    model.tie_weights()
    model.save_pretrained(out)
    (out / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 32768}))
    (out / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")


def child_adapter(base: Path, out: Path) -> None:
    import warnings

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2VLForConditionalGeneration

    warnings.simplefilter("ignore")
    model = Qwen2VLForConditionalGeneration.from_pretrained(base, dtype=torch.bfloat16)
    cfg = LoraConfig(r=64, lora_alpha=128, target_modules="all-linear", modules_to_save=["embed_tokens", "lm_head"])
    pm = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:  # simulated training: every trainable tensor moves
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(0.01).to(p.dtype))
    pm.save_pretrained(out)


def child_peft_merge(base: Path, adapter: Path, out: Path) -> None:
    import warnings

    import torch
    from peft import PeftModel
    from transformers import Qwen2VLForConditionalGeneration

    warnings.simplefilter("ignore")
    model = Qwen2VLForConditionalGeneration.from_pretrained(base, dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(model, adapter)
    merged = model.merge_and_unload()
    merged.save_pretrained(out)


def child_products(adapter: Path) -> None:
    """Seconds of the adapter's LoRA products alone (fp32 B @ A over every LoRA'd weight, merge-sized chunks)."""
    import torch
    from safetensors import safe_open

    from qvl_plugin.ckpt import merge_math as mm

    from qvl_plugin.ckpt import merge_rows as mr
    from qvl_plugin.ckpt.reader import CHUNK_ELEMENTS

    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as h:
        keys = list(h.keys())
        pairs = [(h.get_tensor(k).float(), h.get_tensor(k.replace("lora_A", "lora_B")).float()) for k in keys if ".lora_A." in k]
    buf = torch.empty(CHUNK_ELEMENTS * 2, dtype=torch.float32)
    t0 = time.perf_counter()
    for a, b in pairs:
        out_f, in_f = b.shape[0], a.shape[1]
        for start, stop in mr.row_spans(out_f, max(mm.MIN_CHUNK_ROWS, CHUNK_ELEMENTS // in_f)):
            torch.mm(b[start:stop], a, out=buf[: (stop - start) * in_f].view(stop - start, in_f))
    print(json.dumps({"seconds": time.perf_counter() - t0, "pairs": len(pairs)}))


def child_compare(a: Path, b: Path) -> None:
    """Stream both outputs tensor by tensor: same keys, bitwise equal?"""
    from safetensors import safe_open

    def index(d: Path) -> dict[str, Path]:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                out.update({k: f for k in h.keys()})
        return out

    ia, ib = index(a), index(b)
    equal, worst = 0, 0.0
    for k in sorted(set(ia) & set(ib)):
        with safe_open(str(ia[k]), "pt") as ha, safe_open(str(ib[k]), "pt") as hb:
            x, y = ha.get_tensor(k), hb.get_tensor(k)
        if x.shape == y.shape and x.dtype == y.dtype and bool((x == y).all()):
            equal += 1
        else:
            worst = max(worst, float((x.float() - y.float()).abs().max()) if x.shape == y.shape else float("inf"))
    print(json.dumps({"only_a": sorted(set(ia) - set(ib)), "only_b": sorted(set(ib) - set(ia)), "equal": equal,
                      "common": len(set(ia) & set(ib)), "max_abs_diff": worst}))


# ------------------------------------------------------------------------------------------------------------
# the driver


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _warm(*paths: Path) -> None:
    for p in paths:
        for f in sorted(p.rglob("*")):
            if f.is_file():
                with open(f, "rb") as h:
                    while h.read(64 << 20):
                        pass


def _measure(cmd: list[str], capture: bool = False, pythonpath: Path = REPO, env: dict[str, str] | None = None) -> dict:
    """Run one command in its own process: wall seconds, peak RSS (MB) from wait4, stdout."""
    import tempfile

    with tempfile.TemporaryFile() as errf:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE if capture else subprocess.DEVNULL, stderr=errf, cwd=pythonpath,
                                env={**os.environ, "PYTHONPATH": str(pythonpath), "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1", **(env or {})})
        out = proc.stdout.read().decode() if capture else ""
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        errf.seek(0)
        err = errf.read().decode(errors="replace")
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{err[-2000:]}")
    return {"seconds": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "rss_mb": usage.ru_maxrss / 1024, "stdout": out}


def _median_run(ms: list[dict]) -> dict:
    """Medians of the runs' wall time, peak RSS and (for qvl) each part of the reported time split."""
    out = {"seconds": statistics.median(m["seconds"] for m in ms), "cpu_s": statistics.median(m["cpu_s"] for m in ms),
           "rss_mb": statistics.median(m["rss_mb"] for m in ms), "runs": len(ms)}
    if "report" in ms[0]:
        out["report"] = {k: statistics.median(m["report"][k] for m in ms) for k in ms[0]["report"]}
    return out


def _py(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *args]


def _run_size(work: Path, layers: int, repeat: int, skip_peft: bool, ref: Path | None = None) -> dict:
    base, adapter = work / f"base-L{layers}", work / f"adapter-L{layers}"
    if not (base / "config.json").is_file():
        print(f"building base with {layers} layers ...", file=sys.stderr)
        _measure(_py("--child", "build", "--layers", str(layers), "--out", str(base)))
    if not (adapter / "adapter_config.json").is_file():
        print("building the r=64 all-linear + embed/head adapter with PEFT ...", file=sys.stderr)
        _measure(_py("--child", "adapter", "--base", str(base), "--out", str(adapter)))
    res: dict = {"layers": layers, "base_bytes": _size(base), "adapter_bytes": _size(adapter)}
    runs = {
        "copy": lambda out: (["cp", "-r", str(base), str(out)], False),
        "qvl": lambda out: ([sys.executable, "-c", "from qvl_plugin.cli import main; main()", "merge", str(adapter), "--base", str(base),
                             "-o", str(out), "--json"], True),
        "peft": lambda out: (_py("--child", "peft-merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out)), False),
    }
    if ref is not None:  # another checkout's qvl_plugin (e.g. the previous commit), paired with this one
        runs["qvl-ref"] = runs["qvl"]
    runs[f"qvl-{OTHER_WRITER}"] = runs["qvl"]  # the writer mode this machine does not pick by default, paired
    names = [n for n in runs if not (n == "peft" and skip_peft)]
    all_runs: dict[str, list[dict]] = {n: [] for n in names}
    for rep in range(repeat):
        for name in names[rep % len(names):] + names[: rep % len(names)]:  # paired: rotating order
            out = work / f"out-{name}-L{layers}"
            shutil.rmtree(out, ignore_errors=True)
            _warm(base, adapter)
            os.sync()
            cmd, capture = runs[name](out)
            print(f"  {name} (run {rep + 1}) ...", file=sys.stderr)
            m = _measure(cmd, capture, ref if name == "qvl-ref" else REPO, {"QVL_MERGE_WRITER": OTHER_WRITER} if name == f"qvl-{OTHER_WRITER}" else None)
            os.sync()
            if name.startswith("qvl"):
                m["report"] = json.loads(m.pop("stdout"))["seconds"]
            else:
                m.pop("stdout")
            all_runs[name].append(m)
            if name == "copy" or rep != repeat - 1:
                shutil.rmtree(out, ignore_errors=True)
    for name, ms in all_runs.items():
        res[name] = _median_run(ms)
    prods = [_measure(_py("--child", "products", "--adapter", str(adapter)), True) for _ in range(repeat)]
    res["products"] = statistics.median(json.loads(m["stdout"])["seconds"] for m in prods)
    res["products_process"] = statistics.median(m["seconds"] for m in prods)
    if not skip_peft:
        cmp = _measure(_py("--child", "compare", "--a", str(work / f"out-qvl-L{layers}"), "--b", str(work / f"out-peft-L{layers}")), True)
        res["compare"] = json.loads(cmp["stdout"])
    for name in ("qvl", "peft", "qvl-ref", f"qvl-{OTHER_WRITER}"):
        shutil.rmtree(work / f"out-{name}-L{layers}", ignore_errors=True)
    return res


# the writer mode (qvl_plugin.ckpt.merge.writer_thread_default) that merges into --workdir do not use by default
OTHER_WRITER = "thread"


def _ratio(r: dict) -> float:
    """inline seconds / thread seconds: > 1 when the writer thread is faster."""
    t, i = (r["qvl"], r["qvl-inline"]) if OTHER_WRITER == "inline" else (r["qvl-thread"], r["qvl"])
    return i["seconds"] / t["seconds"]


# Qwen2-VL bf16 checkpoint sizes (bytes of safetensors), for the projection only
PROJECT = {"Qwen2-VL-7B (16.6 GB)": 16.6e9, "Qwen2-VL-72B (147 GB)": 147e9}


def _fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares line y = a + b x."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def _table(results: list[dict], startup: dict) -> str:
    gb = lambda n: f"{n / 1e9:.2f} GB"
    lines = [
        "| base (bf16) | (a) qvl-ckpt merge | (b) PEFT merge path | (c) cp -r | (d) LoRA products | (a) vs (b) time | (a) vs (b) peak RSS "
        "| (d') products as a process | (a) / ((c)+(d)) | (a) / ((c)+(d')) "
        "| (a) split: plan / read / LoRA math / write / kernel copy / waiting for writes / verify |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        a, c, d = r["qvl"], r["copy"], r["products"]
        b = r.get("peft")
        s = a["report"]
        split = f"{s['plan']:.2f} / {s['read']:.2f} / {s['math']:.2f} / {s['write']:.2f} / {s['copy']:.2f} / {s.get('wait', 0):.2f} / {s['commit']:.2f} s"
        dp = r.get("products_process", float("nan"))
        lines.append(
            f"| {gb(r['base_bytes'])} ({r['layers']} layers) | {a['seconds']:.1f} s (CPU {a['cpu_s']:.1f} s), {a['rss_mb']:.0f} MB | "
            + (f"{b['seconds']:.1f} s, {b['rss_mb']:.0f} MB" if b else "not run") + f" | {c['seconds']:.1f} s | {d:.1f} s | "
            + (f"{b['seconds'] / a['seconds']:.1f}x faster" if b else "") + " | "
            + (f"{a['rss_mb'] / b['rss_mb']:.2f}x" if b else "") + f" | {dp:.1f} s | {a['seconds'] / (c['seconds'] + d):.2f} | "
            f"{a['seconds'] / (c['seconds'] + dp):.2f} | {split} |"
        )
    if len(results) > 1:
        lines.append("")
        for i in range(1, len(results)):
            r0, r1 = results[i - 1], results[i]
            lines.append(f"(a) peak RSS {r0['qvl']['rss_mb']:.0f} -> {r1['qvl']['rss_mb']:.0f} MB ({r1['qvl']['rss_mb'] / r0['qvl']['rss_mb']:.2f}x) "
                         f"when layers go {r0['layers']} -> {r1['layers']} (base {r1['base_bytes'] / r0['base_bytes']:.2f}x).")
        xs = [r["base_bytes"] / 1e9 for r in results]
        for what in ("seconds", "cpu_s"):  # wall time, and CPU time (user + sys: less sensitive to other jobs on the cores)
            a0, slope = _fit(xs, [r["qvl"][what] for r in results])
            worst = max(abs(a0 + slope * x - r["qvl"][what]) / r["qvl"][what] for x, r in zip(xs, results))
            proj = ", ".join(f"{name}: ~{a0 + slope * n / 1e9:.0f} s" for name, n in PROJECT.items())
            lines.append(f"(a) {'wall' if what == 'seconds' else 'CPU'} time ≈ {a0:.2f} s + {slope:.2f} s/GB (least squares over {len(xs)} sizes, "
                         f"worst residual {100 * worst:.0f}%); extrapolation, not measured: {proj}.")
        lines.append(f"Process start-up alone (python + the imports of `qvl-ckpt merge`: torch, safetensors, qvl_plugin; median): {startup['seconds']:.1f} s, {startup['rss_mb']:.0f} MB.")
    mode = "inline" if OTHER_WRITER == "thread" else "thread"
    for r in results:
        x, y = r[f"qvl-{OTHER_WRITER}"], r["qvl"]
        lines.append(f"{gb(r['base_bytes'])}: writer {mode} (this machine's default) {y['seconds']:.2f} s, {y['rss_mb']:.0f} MB; "
                     f"writer {OTHER_WRITER} {x['seconds']:.2f} s, {x['rss_mb']:.0f} MB (the writer thread is {_ratio(r):.2f}x as fast).")
    for r in results:
        if "qvl-ref" in r:
            x, y = r["qvl-ref"], r["qvl"]
            lines.append(f"{gb(r['base_bytes'])}: --ref tree {x['seconds']:.2f} s, {x['rss_mb']:.0f} MB; this tree {y['seconds']:.2f} s, {y['rss_mb']:.0f} MB "
                         f"({x['seconds'] / y['seconds']:.2f}x).")
    for r in results:
        if "compare" in r:
            c = r["compare"]
            lines.append(f"{gb(r['base_bytes'])}: (a) and (b) outputs: {c['equal']}/{c['common']} common tensors bitwise equal "
                         f"(max abs diff {c['max_abs_diff']:.3g}); only in (a): {c['only_a'] or '-'}; only in (b): {c['only_b'] or '-'}.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/qvl-bench"))
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 12, 36], help="language layers per size (4 ≈ 0.9 GB, 12 ≈ 1.7 GB, 36 ≈ 3.9 GB)")
    ap.add_argument("--repeat", type=int, default=3, help="paired runs per measurement; medians are reported")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic bases and adapters")
    ap.add_argument("--ref", type=Path, help="also time the qvl_plugin of this tree (e.g. `git archive HEAD~1 | tar -x -C DIR`), paired")
    ap.add_argument("--peft-max-layers", type=int, default=12, help="run (b) only up to this many layers")
    ap.add_argument("--child", choices=["build", "adapter", "peft-merge", "compare", "products"], help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--base", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--adapter", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--a", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--b", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "build":
        return child_build(args.layers[0], args.out)
    if args.child == "adapter":
        return child_adapter(args.base, args.out)
    if args.child == "peft-merge":
        return child_peft_merge(args.base, args.adapter, args.out)
    if args.child == "compare":
        return child_compare(args.a, args.b)
    if args.child == "products":
        return child_products(args.adapter)

    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    global OTHER_WRITER
    from qvl_plugin.ckpt.merge import writer_thread_default
    from qvl_plugin.ckpt.sink import takes_o_direct

    OTHER_WRITER = "inline" if writer_thread_default(takes_o_direct(work)) else "thread"
    starts = [_measure([sys.executable, "-c", "import qvl_plugin.cli, qvl_plugin.ckpt.merge"]) for _ in range(args.repeat)]
    startup = {k: statistics.median(m[k] for m in starts) for k in ("seconds", "rss_mb")}  # what `qvl-ckpt merge` imports
    results = [_run_size(work, n, args.repeat, args.skip_peft or n > args.peft_max_layers, args.ref) for n in args.layers]
    (work / "bench.json").write_text(json.dumps({"startup": startup, "results": results}, indent=2))
    print(_table(results, startup))
    if not args.keep:
        for n in args.layers:
            shutil.rmtree(work / f"base-L{n}", ignore_errors=True)
            shutil.rmtree(work / f"adapter-L{n}", ignore_errors=True)


if __name__ == "__main__":
    main()
