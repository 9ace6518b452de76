"""Benchmark: ``qvl-ckpt inspect`` of a 20 GB safetensors file vs reading the same header bare.

    python tools/bench_inspect.py --workdir /tmp/qvl-bench-inspect --repeat 7

Writes a sparse 20 GB ``model.safetensors`` whose header has the tensor names and shapes of a Qwen2-VL-7B-like
checkpoint (no data pages are written: the file is sparse). Then, in paired runs (each measurement its own
process, order alternated, wall time and peak RSS from ``wait4``), measures:

  (a) ``qvl-ckpt inspect FILE``
  (b) ``python -c "safe_open(FILE, 'pt').keys()"``: the bare header read the issue compares against
  (b') the same with ``framework='numpy'`` (no torch import)
  (c) ``python -c "import qvl_plugin"``: interpreter + package import, the fixed floor

and prints medians as a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build(path: Path, target_bytes: int = 20 * 10**9) -> None:
    """A header shaped like Qwen2-VL-7B (28 layers, hidden 3584) padded with one big tensor to reach the size."""
    hidden, inter, vocab, layers = 3584, 18944, 152064, 28
    shapes: dict[str, list[int]] = {"model.embed_tokens.weight": [vocab, hidden], "lm_head.weight": [vocab, hidden],
                                    "model.norm.weight": [hidden]}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n, s in {"self_attn.q_proj.weight": [hidden, hidden], "self_attn.k_proj.weight": [512, hidden],
                     "self_attn.v_proj.weight": [512, hidden], "self_attn.o_proj.weight": [hidden, hidden],
                     "self_attn.q_proj.bias": [hidden], "self_attn.k_proj.bias": [512], "self_attn.v_proj.bias": [512],
                     "mlp.gate_proj.weight": [inter, hidden], "mlp.up_proj.weight": [inter, hidden],
                     "mlp.down_proj.weight": [hidden, inter], "input_layernorm.weight": [hidden],
                     "post_attention_layernorm.weight": [hidden]}.items():
            shapes[p + n] = s
    for i in range(32):
        p = f"visual.blocks.{i}."
        for n, s in {"attn.qkv.weight": [3840, 1280], "attn.proj.weight": [1280, 1280], "mlp.fc1.weight": [5120, 1280],
                     "mlp.fc2.weight": [1280, 5120], "norm1.weight": [1280], "norm2.weight": [1280]}.items():
            shapes[p + n] = s
    used = sum(2 * _prod(s) for s in shapes.values())
    pad = max(0, (target_bytes - used) // 2)
    shapes["zz_padding.weight"] = [pad]
    header, pos = {"__metadata__": {"format": "pt"}}, 0
    for name, s in shapes.items():
        n = 2 * _prod(s)
        header[name] = {"dtype": "BF16", "shape": s, "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + pos)


def _prod(s: list[int]) -> int:
    out = 1
    for x in s:
        out *= x
    return out


def measure(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd="/")
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    f = args.workdir / "model.safetensors"
    if not f.exists():
        build(f)
    qvl = str(Path(sys.executable).with_name("qvl-ckpt"))
    cmds = {
        "(a) qvl-ckpt inspect": [qvl, "inspect", str(f)],
        "(b) bare safe_open().keys()": [sys.executable, "-c", f"from safetensors import safe_open; safe_open({str(f)!r}, 'pt').keys()"],
        "(b') bare safe_open(.., 'numpy').keys()": [sys.executable, "-c", f"from safetensors import safe_open; safe_open({str(f)!r}, 'numpy').keys()"],
        "(c) python -c 'import qvl_plugin'": [sys.executable, "-c", "import qvl_plugin"],
    }
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in cmds}
    for i in range(args.repeat):
        order = list(cmds) if i % 2 == 0 else list(reversed(cmds))
        for k in order:
            results[k].append(measure(cmds[k]))
    med = {k: (statistics.median(w for w, _ in v), statistics.median(r for _, r in v)) for k, v in results.items()}
    size = f.stat().st_size / 1e9
    print(f"file: {size:.1f} GB (sparse), {args.repeat} paired runs, medians\n")
    print("| command | wall | peak RSS | vs (b) |")
    print("|---|---|---|---|")
    b = med["(b) bare safe_open().keys()"][0]
    for k, (w, r) in med.items():
        print(f"| {k} | {w:.3f} s | {r:.0f} MB | {w / b:.2f}x |")


if __name__ == "__main__":
    main()
