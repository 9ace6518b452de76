"""--device auto|cpu|cuda: resolution, plumbing to the products (merge, diff --base, extract), errors.

There is no GPU here: "cuda" is simulated by making torch appear to have one and recording the device
each product's inputs are sent to (the arithmetic itself stays on the CPU), so the test proves the chosen
device reaches the product code; real CUDA runs are in tools/bench_devices.py.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from qvl_plugin.ckpt import devices, diff as diff_mod, effect, extract as extract_mod, merge as merge_mod, svd as svd_mod
from qvl_plugin.ckpt import merge_math as mm
from qvl_plugin.ckpt import merge_rows as mr
from qvl_plugin.ckpt.diff import diff_checkpoints
from qvl_plugin.ckpt.extract import extract
from qvl_plugin.ckpt.merge import merge
from qvl_plugin.cli import main
from qvl_plugin.errors import UsageError
from tests.factories import ADAPTER_VARIANTS, make_adapter


def _files(d: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(d.glob("*.safetensors"))}


@pytest.fixture(scope="module")
def adapters(qwen2_vl_tied_base, tmp_path_factory):
    model, base = qwen2_vl_tied_base
    d = tmp_path_factory.mktemp("devices")
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for v in ("linear-embed-head", "dora"):
            out[v] = make_adapter(model, ADAPTER_VARIANTS[v]("x"), d / v)[1]
    return base, out


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch 'sees' a GPU; moving a tensor to it records the device and keeps the tensor on the CPU."""
    seen: list[str] = []

    def to_device(t, device):
        seen.append(str(device))
        return t

    monkeypatch.setattr(devices, "cuda_available", lambda: True)
    for mod in (merge_mod, effect, extract_mod, svd_mod):
        monkeypatch.setattr(mod, "to_device", to_device)
    return seen


def test_resolve():
    assert devices.resolve_device("cpu") == torch.device("cpu")
    assert devices.resolve_device("auto") == (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    assert devices.resolve_device(None) == devices.resolve_device("auto")
    with pytest.raises(UsageError, match="unknown device"):
        devices.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA GPU"):
            devices.resolve_device("cuda")


def test_auto_prefers_cuda_when_present(monkeypatch):
    monkeypatch.setattr(devices, "cuda_available", lambda: True)
    assert devices.resolve_device("auto") == torch.device("cuda")
    assert devices.resolve_device("cuda") == torch.device("cuda")


@pytest.mark.parametrize("kind,fifo,dtype", [("linear", False, torch.bfloat16), ("linear", True, torch.float32),
                                             ("embedding", False, torch.bfloat16), ("embedding", False, torch.float32)])
def test_device_rows_path_is_the_cpu_sequence(kind, fifo, dtype):
    """The accelerator branch of lora_rows, run on the CPU, gives the CPU path's bits (same operation order)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(160, 96, generator=g).to(dtype)
    r = 8
    out_f, in_f = (w.shape[1], w.shape[0]) if (fifo or kind == "embedding") else w.shape
    a, b = torch.randn(r, in_f, generator=g), torch.randn(out_f, r, generator=g)
    for start, stop in ((0, 64), (64, 160)):
        want = mr.lora_rows(w[start:stop], start, stop, a, b, 0.5, kind=kind, fan_in_fan_out=fifo, out_dtype=torch.bfloat16)
        got = mr._rows_on(torch.device("cpu"), w[start:stop], start, stop, a, b, 0.5, kind, fifo, torch.bfloat16)
        assert torch.equal(want, got)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dora_rows_give_the_whole_merge_bits(dtype):
    """DoRA on a Linear streams by rows (on any device): chunks of >= MIN_CHUNK_ROWS rows, the whole result."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(300, 96, generator=g).mul_(0.02).to(dtype)
    a, b, m = torch.randn(8, 96, generator=g) * 0.1, torch.randn(300, 8, generator=g) * 0.1, torch.rand(300, generator=g) + 0.5
    whole = mm.merge_dora(w, a, b, m, 0.7, out_dtype=torch.bfloat16)
    for step in (64, 100, 300):
        parts = [mr.dora_rows(w[i:j], i, j, a, b, m, 0.7, out_dtype=torch.bfloat16) for i, j in mr.row_spans(300, step)]
        assert torch.equal(torch.cat(parts), whole)
    assert mr.dora_streams_by_rows("linear", False) and not mr.dora_streams_by_rows("linear", True)
    assert not mr.dora_streams_by_rows("embedding", False) and mr.dora_streams_by_rows("conv", False)


@pytest.mark.parametrize("variant", ["linear-embed-head", "dora"])
def test_merge_auto_equals_cpu_and_device_reaches_products(adapters, tmp_path, fake_cuda, variant):
    base, ads = adapters
    r_cpu = merge(ads[variant], base, tmp_path / "cpu", device="cpu")
    assert r_cpu.device == "cpu" and not any(d != "cpu" for d in fake_cuda)
    fake_cuda.clear()
    r_gpu = merge(ads[variant], base, tmp_path / "gpu", device="auto")  # auto -> the (simulated) GPU
    assert r_gpu.device == "cuda" and fake_cuda and set(fake_cuda) == {"cuda"}
    assert _files(tmp_path / "cpu") == _files(tmp_path / "gpu")


def test_merge_auto_on_this_machine_equals_cpu(adapters, tmp_path):
    base, ads = adapters
    r = merge(ads["dora"], base, tmp_path / "auto")
    merge(ads["dora"], base, tmp_path / "cpu", device="cpu")
    assert r.device == str(devices.resolve_device("auto"))
    if r.device == "cpu":
        assert _files(tmp_path / "auto") == _files(tmp_path / "cpu")


def test_diff_with_base_device(adapters, tmp_path, fake_cuda):
    base, ads = adapters
    merge(ads["dora"], base, tmp_path / "m", device="cpu")
    fake_cuda.clear()
    cpu = diff_checkpoints(ads["dora"], tmp_path / "m", base=base, device="cpu").to_dict()
    assert set(fake_cuda) <= {"cpu"}
    fake_cuda.clear()
    gpu = diff_checkpoints(ads["dora"], tmp_path / "m", base=base, device="auto").to_dict()
    assert fake_cuda and set(fake_cuda) == {"cuda"} and cpu == gpu and cpu["equal"]


def test_extract_device(adapters, tmp_path, fake_cuda):
    base, ads = adapters
    merge(ads["linear-embed-head"], base, tmp_path / "m", device="cpu")
    fake_cuda.clear()
    cpu = extract(tmp_path / "m", base, tmp_path / "x-cpu", rank=4, device="cpu")
    assert set(fake_cuda) <= {"cpu"} and cpu.device == "cpu"
    fake_cuda.clear()
    gpu = extract(tmp_path / "m", base, tmp_path / "x-gpu", rank=4, device="auto")
    assert gpu.device == "cuda" and fake_cuda and set(fake_cuda) == {"cuda"}
    assert [m.to_dict() for m in cpu.modules] == [m.to_dict() for m in gpu.modules]
    assert _files(tmp_path / "x-cpu") == _files(tmp_path / "x-gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cli_cuda_without_gpu_is_one_error_line(adapters, tmp_path):
    base, ads = adapters
    run = lambda *a: CliRunner().invoke(main, [str(x) for x in a])
    r = run("merge", ads["dora"], "--base", base, "-o", tmp_path / "o", "--device", "cuda")
    assert r.exit_code == 1 and r.output.startswith("error: ") and "CUDA" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
    r = run("extract", base, "--base", base, "-o", tmp_path / "x", "--device", "cuda")
    assert r.exit_code == 1 and r.output.startswith("error: ") and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
    r = run("diff", ads["dora"], base, "--base", base, "--device", "cuda")
    assert r.exit_code == 2 and r.output.startswith("error: ") and len(r.output.strip().splitlines()) == 1  # diff: 1 means "different"
    r = run("merge", ads["dora"], "--base", base, "-o", tmp_path / "o", "--device", "tpu")
    assert r.exit_code == 2
