"""Benchmark: qvl-ckpt merge vs the PEFT merge path vs a plain copy, at two model sizes.

    python tools/bench_merge.py --workdir bench-merge --repeat 3   # ~1.1 and ~2.2 GB, ~6 min

Builds a synthetic Qwen2-VL-shaped bf16 checkpoint with the real 2B widths (hidden 1536, MLP 8960, vocab
151936, tied embeddings, vision width 1280) and fewer layers, plus an r=64 ``all-linear`` adapter with
modules_to_save embed_tokens + lm_head made by PEFT. Then measures, each in its own process (wall time,
peak RSS from ``wait4``):

  (a) ``qvl-ckpt merge ADAPTER --base BASE -o OUT``
  (b) the PEFT path: from_pretrained, PeftModel.from_pretrained, merge_and_unload, save_pretrained
  (c) ``cp -r BASE OUT`` (the I/O floor)

The page cache is warmed before each run (every run reads warm files) and outputs are synced and
deleted after. (a)'s own report splits its time into read / LoRA math / write / kernel copy. The
outputs of (a) and (b) are compared tensor by tensor (bitwise). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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


def _measure(cmd: list[str], capture: bool = False) -> dict:
    """Run one command in its own process: wall seconds, peak RSS (MB) from wait4, stdout."""
    import tempfile

    with tempfile.TemporaryFile() as errf:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE if capture else subprocess.DEVNULL, stderr=errf, cwd=REPO,
                                env={**os.environ, "PYTHONPATH": str(REPO), "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"})
        out = proc.stdout.read().decode() if capture else ""
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        errf.seek(0)
        err = errf.read().decode(errors="replace")
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{err[-2000:]}")
    return {"seconds": wall, "rss_mb": usage.ru_maxrss / 1024, "stdout": out}


def _py(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *args]


def _run_size(work: Path, layers: int, repeat: int, skip_peft: bool) -> dict:
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
    for name, make in runs.items():
        if name == "peft" and skip_peft:
            continue
        best = None
        for _ in range(repeat):
            out = work / f"out-{name}-L{layers}"
            shutil.rmtree(out, ignore_errors=True)
            _warm(base, adapter)
            os.sync()
            cmd, capture = make(out)
            print(f"  {name} ...", file=sys.stderr)
            m = _measure(cmd, capture)
            os.sync()
            if name.startswith("qvl"):
                m["report"] = json.loads(m.pop("stdout"))["seconds"]
            else:
                m.pop("stdout")
            if best is None or m["seconds"] < best["seconds"]:
                best = m
            if name == "copy" or _ != repeat - 1:
                shutil.rmtree(out, ignore_errors=True)
        res[name] = best
    if not skip_peft:
        cmp = _measure(_py("--child", "compare", "--a", str(work / f"out-qvl-L{layers}"), "--b", str(work / f"out-peft-L{layers}")), True)
        res["compare"] = json.loads(cmp["stdout"])
    for name in ("qvl", "peft"):
        shutil.rmtree(work / f"out-{name}-L{layers}", ignore_errors=True)
    return res


def _table(results: list[dict], startup: dict) -> str:
    gb = lambda n: f"{n / 1e9:.2f} GB"
    lines = [
        "| base (bf16) | (a) qvl-ckpt merge | (b) PEFT merge path | (c) cp -r | (a) vs (b) time | (a) vs (b) peak RSS | (a)/(c) time | (a) split: plan / read / LoRA math / write / kernel copy / verify |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        a, c = r["qvl"], r["copy"]
        b = r.get("peft")
        s = a["report"]
        split = f"{s['plan']:.2f} / {s['read']:.2f} / {s['math']:.2f} / {s['write']:.2f} / {s['copy']:.2f} / {s['commit']:.2f} s"
        lines.append(
            f"| {gb(r['base_bytes'])} ({r['layers']} layers) | {a['seconds']:.1f} s, {a['rss_mb']:.0f} MB | "
            + (f"{b['seconds']:.1f} s, {b['rss_mb']:.0f} MB" if b else "n/a") + f" | {c['seconds']:.1f} s | "
            + (f"{b['seconds'] / a['seconds']:.1f}x faster" if b else "") + " | "
            + (f"{a['rss_mb'] / b['rss_mb']:.2f}x" if b else "") + f" | {a['seconds'] / c['seconds']:.1f} | {split} |"
        )
    if len(results) > 1:
        a0, a1 = results[0]["qvl"]["rss_mb"], results[-1]["qvl"]["rss_mb"]
        size = results[-1]["base_bytes"] / results[0]["base_bytes"]
        lines.append("")
        lines.append(f"(a) peak RSS grows {100 * (a1 - a0) / a0:+.1f}% when the base grows {size:.2f}x. "
                     f"Process start-up alone (python + torch + transformers + qvl_plugin imports): {startup['seconds']:.1f} s, {startup['rss_mb']:.0f} MB.")
    for r in results:
        if "compare" in r:
            c = r["compare"]
            lines.append(f"{gb(r['base_bytes'])}: (a) and (b) outputs: {c['equal']}/{c['common']} common tensors bitwise equal "
                         f"(max abs diff {c['max_abs_diff']:.3g}); only in (a): {c['only_a'] or '-'}; only in (b): {c['only_b'] or '-'}.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("bench-merge"))
    ap.add_argument("--layers", type=int, nargs="+", default=[5, 17], help="language layers per size (5 ≈ 1.1 GB, 17 ≈ 2.2 GB)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per measurement; the fastest is kept")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic bases and adapters")
    ap.add_argument("--child", choices=["build", "adapter", "peft-merge", "compare"], help=argparse.SUPPRESS)
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

    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    startup = _measure([sys.executable, "-c", "import qvl_plugin.cli, qvl_plugin.ckpt.merge, peft"])
    results = [_run_size(work, n, args.repeat, args.skip_peft) for n in args.layers]
    (work / "bench.json").write_text(json.dumps({"startup": startup, "results": results}, indent=2))
    print(_table(results, startup))
    if not args.keep:
        for n in args.layers:
            shutil.rmtree(work / f"base-L{n}", ignore_errors=True)
            shutil.rmtree(work / f"adapter-L{n}", ignore_errors=True)


if __name__ == "__main__":
    main()
