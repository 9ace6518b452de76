"""Benchmark: the LoRA products and SVDs on the CPU and, when torch sees one, on the GPU (``--device``).

    python tools/bench_devices.py --repeat 3

In-process, no files: synthetic bf16 weights with the Qwen2-VL-2B widths (MLP 8960 x 1536, attention
1536 x 1536, the 151936 x 1536 embedding) and r=64 fp32 factors. For each device: the streaming merge's
row-chunk products (``merge_math.lora_rows``, the chunk size the merge uses) over every matrix, and the
extract SVDs (exact and randomized) of one 8960 x 1536 delta. On a GPU it also reports how the merged bf16
values compare with the CPU's (elements that differ, largest difference in units in the last place).
Without a GPU it prints the CPU figures and says so. Medians of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from qvl_plugin.ckpt import merge_rows as mr  # noqa: E402
from qvl_plugin.ckpt.svd import truncated_svd as _svd  # noqa: E402
from qvl_plugin.ckpt.merge import _rows_per_chunk  # noqa: E402

SHAPES = {"mlp (8960x1536)": ((8960, 1536), "linear"), "attn (1536x1536)": ((1536, 1536), "linear"),
          "embedding (151936x1536)": ((151936, 1536), "embedding")}
RANK = 64


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _merge_all(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, kind: str) -> torch.Tensor:
    out = torch.empty_like(w)
    work = torch.empty(2 * _rows_per_chunk(tuple(w.shape)) * w.shape[1], dtype=torch.float32)
    for start, stop in mr.row_spans(w.shape[0], _rows_per_chunk(tuple(w.shape))):
        out[start:stop] = mr.lora_rows(w[start:stop], start, stop, a, b, 2.0, kind=kind, out_dtype=torch.bfloat16,
                                       work=work if a.device.type == "cpu" else None)
    return out


def _ulps(x: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
    """(elements that differ, largest difference in bf16 units in the last place) -- same-sign values."""
    xi, yi = x.view(torch.int16).int(), y.view(torch.int16).int()
    diff = (xi - yi).abs()
    return int((diff != 0).sum()), int(diff.max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    g = torch.Generator().manual_seed(0)
    lines = ["| work | " + " | ".join(str(d) for d in devices) + " | cuda vs cpu bits |", "|---|" + "---|" * (len(devices) + 1)]
    for label, (shape, kind) in SHAPES.items():
        w = torch.randn(shape, generator=g).mul_(0.02).to(torch.bfloat16)
        out_f, in_f = (shape[1], shape[0]) if kind == "embedding" else shape
        a, b = torch.randn(RANK, in_f, generator=g) / RANK, torch.randn(out_f, RANK, generator=g) * 1e-2
        times, results = [], []
        for dev in devices:
            ad, bd = a.to(dev), b.to(dev)
            runs = []
            for _ in range(args.repeat):
                _sync(dev)
                t0 = time.perf_counter()
                res = _merge_all(w, ad, bd, kind)
                _sync(dev)
                runs.append(time.perf_counter() - t0)
            times.append(statistics.median(runs))
            results.append(res)
        gb = w.numel() * 2 / 1e9
        cmp = ""
        if len(results) > 1:
            n, worst = _ulps(results[0], results[1])
            cmp = f"{n} of {w.numel()} differ, max {worst} ulp"
        lines.append(f"| LoRA merge, {label} | " + " | ".join(f"{t:.3f} s ({gb / t:.2f} GB/s)" for t in times) + f" | {cmp} |")
    delta = (torch.randn(8960, RANK, generator=g) @ torch.randn(RANK, 1536, generator=g)).mul_(1e-3)
    delta += torch.randn(8960, 1536, generator=g).mul_(2.5e-4)
    for method in ("exact", "lowrank"):
        times, errs = [], []
        for dev in devices:
            runs = []
            for _ in range(args.repeat):
                _sync(dev)
                t0 = time.perf_counter()
                _, _, err, _ = _svd(delta, RANK, method=method, device=dev)
                _sync(dev)
                runs.append(time.perf_counter() - t0)
            times.append(statistics.median(runs))
            errs.append(err)
        lines.append(f"| extract SVD r={RANK} ({method}), 8960x1536 | " + " | ".join(f"{t:.3f} s (err {e:.5f})" for t, e in zip(times, errs))
                     + f" | {'rel. error differs by ' + format(abs(errs[1] - errs[0]), '.1e') if len(errs) > 1 else ''} |")
    print("\n".join(lines))
    if len(devices) == 1:
        print("\nno CUDA GPU seen by torch: CPU figures only (run on a GPU machine for the cuda column).")


if __name__ == "__main__":
    main()
