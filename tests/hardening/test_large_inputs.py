"""Memory safety on large inputs: a .pth is mmap'd (not read), a 20 GB sparse safetensors is headers-only.

Each measurement runs in a fresh process: peak RSS is reset after imports (``/proc/self/clear_refs`` 5)
and read back as VmHWM, so the number is what opening + summarizing costs, nothing else.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

try:
    from .fuzzlib import st_bytes
except ImportError:
    from fuzzlib import st_bytes

MB = 1024 * 1024

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")

_MEASURE = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from qvl_plugin.ckpt.view import open_checkpoint
    from qvl_plugin.ckpt.inspect import summarize

    def status(field):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(field)

    results = {}
    for name, path, warm, kwargs in json.loads(sys.argv[1]):
        with open_checkpoint(warm, **kwargs) as w:  # same kind, tiny: pays the lazy imports up front
            summarize(w)
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak to the current RSS
            resettable = True
        except OSError:
            resettable = False
        base = status("VmRSS")
        t0 = time.perf_counter()
        with open_checkpoint(path, **kwargs) as ckpt:
            info = summarize(ckpt)
        elapsed = time.perf_counter() - t0
        peak = status("VmHWM") if resettable else status("VmRSS")
        results[name] = {"growth": peak - base, "seconds": elapsed, "total_bytes": info["total_bytes"],
                         "num_tensors": info["num_tensors"], "findings": [f["code"] for f in info["findings"]]}
    print(json.dumps(results))
    """
)


def _measure(jobs: list) -> dict:
    """Run ``[(name, path, warm_path, open_kwargs)]`` in one fresh process (one import bill)."""
    proc = subprocess.run([sys.executable, "-c", _MEASURE, json.dumps(jobs, default=str)], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def _big_pth(tmp_path: Path) -> tuple[Path, Path]:
    """A ~200 MB dump with the manual dump's duplicate keys (same storage twice)."""
    big = torch.zeros(50 * MB, dtype=torch.float32)  # 200 MB
    sd = {
        "base_model.model.model.embed_tokens.modules_to_save.default.weight": big.view(-1, 1024),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight": torch.zeros(8, 64),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight": torch.zeros(64, 8),
    }
    sd.update({"." + k: v for k, v in list(sd.items())})
    path = tmp_path / "big.pth"
    torch.save(sd, path)
    warm = tmp_path / "warm.pth"
    torch.save({k: torch.zeros(2, 2) for k in ("a.lora_A.weight", ".a.lora_A.weight")}, warm)
    return path, warm


def _sparse_safetensors(path: Path, total: int, n_tensors: int = 40) -> Path:
    """A valid header describing ``total`` bytes of bf16 tensors; the data is a hole in the file."""
    rows = total // n_tensors // (2048 * 2)
    header, pos = {}, 0
    for i in range(n_tensors):
        header[f"model.layers.{i}.mlp.up_proj.weight"] = {"dtype": "BF16", "shape": [rows, 2048], "data_offsets": [pos, pos + rows * 2048 * 2]}
        pos += rows * 2048 * 2
    head = st_bytes(header)
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(len(head) + pos)
    return path


def _big_sparse(tmp_path: Path) -> tuple[Path, Path] | None:
    model = tmp_path / "sparse"
    model.mkdir()
    path = _sparse_safetensors(model / "model.safetensors", 20 * 1024 * MB)
    if path.stat().st_blocks * 512 > 64 * MB:
        return None  # the file system does not keep sparse files sparse
    (model / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    warm = tmp_path / "warm-sparse"
    warm.mkdir()
    (warm / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    _sparse_safetensors(warm / "model.safetensors", 40 * 4096 * 2, n_tensors=2)
    return model, warm


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("large")
    if _free_bytes(tmp) < 1024 * MB:
        pytest.skip("needs ~1 GB free disk")
    jobs, sizes = [], {}
    pth, warm = _big_pth(tmp)
    sizes["pth"] = pth.stat().st_size
    jobs.append(("pth", pth, warm, {"lora_alpha": 16}))
    sparse = _big_sparse(tmp)
    if sparse:
        sizes["sparse"] = (sparse[0] / "model.safetensors").stat().st_size
        jobs.append(("sparse", sparse[0], sparse[1], {}))
    res = _measure(jobs)
    for name, r in res.items():
        print(f"\n{name}: {sizes[name] / MB:.0f} MB file, RSS growth {r['growth'] / MB:.1f} MB, {r['seconds']:.3f} s")
    return res, sizes


def test_pth_is_mmapped_not_read(measured):
    res, sizes = measured
    r = res["pth"]
    assert sizes["pth"] > 190 * MB
    assert r["num_tensors"] == 3 and "duplicate-key" in r["findings"]
    assert r["growth"] < 50 * MB, f"RSS grew by {r['growth'] / MB:.0f} MB opening a {sizes['pth'] / MB:.0f} MB dump"


def test_20gb_sparse_safetensors_inspects_in_bounded_memory(measured):
    res, sizes = measured
    if "sparse" not in res:
        pytest.skip("file system does not keep sparse files sparse")
    r = res["sparse"]
    assert sizes["sparse"] > 19 * 1024 * MB
    assert r["total_bytes"] > 19 * 1024 * MB and r["num_tensors"] == 40
    assert r["seconds"] < 5, r
    assert r["growth"] < 200 * MB, r
