"""Benchmark: ``qvl-ckpt extract`` vs ``mergekit-extract-lora`` (mergekit 0.1.5) on the same base/fine-tuned pair.

    python tools/bench_extract.py --workdir /tmp/qvl-bench-extract --layers 4 --repeat 3

Builds, from a config (no downloads), a plain Qwen2 pair with the Qwen2-VL-2B text widths (hidden 1536, MLP
8960, vocab 151936, tied embeddings), ``--layers`` decoder layers, bf16: BASE random, FINE-TUNED = BASE + an
r=64 LoRA-shaped delta on every Linear + a small dense (full-rank) part, as a merged fine-tune looks.
mergekit's Qwen2-VL definition expects the pre-5 transformers key names, so the pair is plain Qwen2, which
both tools read. mergekit runs from its own cached venv (``tests/external/venv.py``), never the project's.

Each extraction runs in its own process (wall time, peak RSS from ``wait4``), paired: every repetition runs
every tool once, in rotating order; medians are reported. Then, per module, the relative reconstruction
error ``||dW - s·B·A||_F / ||dW||_F`` with ``dW = FT - BASE`` in fp32 and each adapter's own factors and
scaling. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_merge import REPO, _measure, _py, _warm  # noqa: E402

HIDDEN, MLP, VOCAB, HEADS, KV_HEADS = 1536, 8960, 151936, 12, 2
RANK = 64


def child_build(layers: int, out: Path, dense: float) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=layers, num_attention_heads=HEADS,
                      num_key_value_heads=KV_HEADS, vocab_size=VOCAB, tie_word_embeddings=True)
    with torch.device("meta"):
        model = Qwen2ForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones(p.shape) if "norm" in name else torch.randn(p.shape, generator=g).mul_(0.02))
        model.tie_weights()
        model.save_pretrained(out / "base")
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):  # a merged r=64 LoRA (std ~2e-3 per element) + a dense part
                o, i = p.shape
                delta = torch.randn(o, RANK, generator=g).mul_(2e-3 / RANK ** 0.5) @ torch.randn(RANK, i, generator=g)
                delta.add_(torch.randn(o, i, generator=g), alpha=dense * 2e-3)
                p.copy_(p.float() + delta)
        model.save_pretrained(out / "ft")


def _module_key(key: str) -> str | None:
    m = re.search(r"layers\.(\d+)\.(.+?)\.lora_[AB]", key)
    return f"layers.{m.group(1)}.{m.group(2)}" if m else None


def child_errors(pair: Path, adapters: list[Path]) -> None:
    """Per module and adapter: ||dW - s·B·A|| / ||dW||, rank. Reads one module at a time."""
    import torch
    from safetensors import safe_open

    def tensors(d: Path) -> dict[str, tuple[Path, str]]:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                out.update({k: (f, k) for k in h.keys()})
        return out

    def get(where: tuple[Path, str]) -> torch.Tensor:
        with safe_open(str(where[0]), "pt") as h:
            return h.get_tensor(where[1])

    base, ft = tensors(pair / "base"), tensors(pair / "ft")
    by_module = {_module_key(f"{k[:-len('.weight')]}.lora_A"): k for k in base if k.endswith("proj.weight")}
    result: dict[str, dict[str, dict]] = {}
    for ad in adapters:
        cfg = json.loads((ad / "adapter_config.json").read_text())
        assert cfg["lora_alpha"] == cfg["r"] and cfg.get("alpha_pattern", {}) == cfg.get("rank_pattern", {}), "scaling 1 expected"
        t = tensors(ad)
        pairs: dict[str, dict[str, str]] = {}
        for k in t:
            mod = _module_key(k)
            if mod is not None:
                pairs.setdefault(mod, {})["a" if ".lora_A" in k else "b"] = k
        rows = {}
        for mod, wkey in sorted(by_module.items()):
            d = get(ft[wkey]).float() - get(base[wkey]).float()
            if mod not in pairs:
                rows[mod] = {"rank": 0, "rel_error": 1.0}
                continue
            a, b = get(t[pairs[mod]["a"]]).float(), get(t[pairs[mod]["b"]]).float()
            rows[mod] = {"rank": a.shape[0], "rel_error": float((d - b @ a).norm() / d.norm())}
        result[ad.name] = rows
    print(json.dumps(result))


def _tools(pair: Path, out: Path, mergekit: Path) -> dict:
    cli = [sys.executable, "-c", "from qvl_plugin.cli import main; main()", "extract", str(pair / "ft"), "--base", str(pair / "base")]
    return {
        "qvl": cli + ["-o", str(out / "qvl"), "--rank", str(RANK), "--json", "--force"],  # --svd auto: randomized here
        "qvl-exact": cli + ["-o", str(out / "qvl-exact"), "--rank", str(RANK), "--svd", "exact", "--json", "--force"],
        "mergekit": [str(mergekit / "bin" / "mergekit-extract-lora"), "--model", str(pair / "ft"), "--base-model", str(pair / "base"),
                     "--out-path", str(out / "mergekit"), "--max-rank", str(RANK), "--quiet"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/qvl-bench-extract"))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dense", type=float, default=0.25, help="dense (full-rank) part of the fine-tune delta, relative to the LoRA part")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--exact-runs", type=int, default=1, help="runs of the exact-SVD qvl variant (slow; the first repetitions)")
    ap.add_argument("--child", choices=["build", "errors"], help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--adapters", type=Path, nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "build":
        return child_build(args.layers, args.out, args.dense)
    if args.child == "errors":
        return child_errors(args.out, args.adapters)

    from tests.external.venv import ensure_venv

    work = args.workdir.resolve()
    pair = work / f"pair-L{args.layers}"
    if not (pair / "ft" / "config.json").is_file():
        print("building the base / fine-tuned pair ...", file=sys.stderr)
        _measure(_py_here("--child", "build", "--layers", str(args.layers), "--out", str(pair), "--dense", str(args.dense)))
    print("mergekit venv ...", file=sys.stderr)
    mergekit = ensure_venv("mergekit", [["torch==2.13.0", "mergekit==0.1.5"]])
    out = work / "out"
    tools = _tools(pair, out, mergekit)
    runs: dict[str, list[dict]] = {k: [] for k in tools}
    names = list(tools)
    for rep in range(args.repeat):
        for name in names[rep % len(names):] + names[: rep % len(names)]:  # paired, rotating order
            if name == "qvl-exact" and rep >= args.exact_runs:
                continue
            shutil.rmtree(out / name, ignore_errors=True)
            _warm(pair)
            print(f"  {name} (run {rep + 1}) ...", file=sys.stderr)
            m = _measure(tools[name], capture=name.startswith("qvl"))
            if name.startswith("qvl"):
                m["report"] = json.loads(m.pop("stdout"))["seconds"]
            runs[name].append(m)
    errs = json.loads(_measure(_py_here("--child", "errors", "--out", str(pair), "--adapters", *[str(out / n) for n in names]), True)["stdout"])
    (work / "bench.json").write_text(json.dumps({"runs": runs, "errors": errs}, indent=2))
    print(_tables(runs, errs, pair))


def _py_here(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *args]


def _tables(runs: dict, errs: dict, pair: Path) -> str:
    size = sum(f.stat().st_size for f in (pair / "base").glob("*.safetensors"))
    label = {"qvl": "`qvl-ckpt extract --rank 64` (randomized SVD)", "qvl-exact": "`qvl-ckpt extract --rank 64 --svd exact`",
             "mergekit": "`mergekit-extract-lora --max-rank 64` (0.1.5)"}
    lines = [f"Pair: {size / 1e9:.2f} GB bf16 per model. Medians of {len(runs['qvl'])} paired runs (exact-SVD variant: {len(runs['qvl-exact'])}).", "",
             "| tool | wall | peak RSS | SVD time | rel. error: median / max over modules |", "|---|---|---|---|---|"]
    for name, ms in runs.items():
        wall = statistics.median(m["seconds"] for m in ms)
        rss = statistics.median(m["rss_mb"] for m in ms)
        svd = f"{statistics.median(m['report']['svd'] for m in ms):.1f} s" if "report" in ms[0] else "n/a"
        e = [r["rel_error"] for r in errs[name].values()]
        lines.append(f"| {label[name]} | {wall:.1f} s | {rss:.0f} MB | {svd} | {statistics.median(e):.5f} / {max(e):.5f} |")
    lines += ["", "| module (layer 0) | " + " | ".join(label[n] for n in runs) + " |", "|---|" + "---|" * len(runs)]
    for mod in sorted(m for m in errs["qvl"] if m.startswith("layers.0.")):
        lines.append(f"| {mod[9:]} | " + " | ".join(f"r={errs[n][mod]['rank']}, {errs[n][mod]['rel_error']:.5f}" for n in runs) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
