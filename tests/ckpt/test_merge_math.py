"""merge_math against PEFT's own layers: the same bits as ``merge_and_unload`` for every layer kind."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from qvl_plugin.ckpt import merge_math as mm

from qvl_plugin.ckpt import merge_rows as mr


class _Toy(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def _layers():
    g = torch.Generator().manual_seed(0)

    def init(m):
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        return m

    return {
        "linear": init(nn.Linear(48, 40, bias=True)),
        "square": init(nn.Linear(32, 32, bias=True)),
        "conv1d_gpt2": init(Conv1D(36, 20)),  # weight (20, 36) = (in, out)
        "embedding": init(nn.Embedding(70, 24)),
        "conv1d": init(nn.Conv1d(6, 10, 3)),
        "conv2d": init(nn.Conv2d(6, 8, (3, 3))),
        "conv2d_1x1": init(nn.Conv2d(8, 12, 1)),
        "conv3d": init(nn.Conv3d(3, 16, (2, 3, 3))),
    }


def _peft(layer: nn.Module, dtype: torch.dtype, *, dora=False, rslora=False, lora_bias=False, r=4, alpha=7, seed=1):
    model = _Toy(copy.deepcopy(layer)).to(dtype)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=["layer"], use_dora=dora, use_rslora=rslora, lora_bias=lora_bias)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if "magnitude" in n else 0.0))
    return pm


def _factors(pm):
    lay = pm.base_model.model.layer
    if hasattr(lay, "lora_embedding_A") and "default" in lay.lora_embedding_A:
        a, b = lay.lora_embedding_A["default"], lay.lora_embedding_B["default"]
    else:
        a, b = lay.lora_A["default"].weight, lay.lora_B["default"].weight
    mag = lay.lora_magnitude_vector["default"].weight if "default" in lay.lora_magnitude_vector else None
    bias = lay.lora_B["default"].bias if hasattr(lay, "lora_B") and "default" in lay.lora_B else None
    return a.detach().clone(), b.detach().clone(), mag, bias, lay.scaling["default"]


def _kind(name: str) -> str:
    return "embedding" if name == "embedding" else "conv" if name.startswith("conv") and name != "conv1d_gpt2" else "linear"


CASES = [(n, dt) for n in _layers() for dt in (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("name,dtype", CASES, ids=[f"{n}-{str(d)[6:]}" for n, d in CASES])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_merge_matches_peft_bitwise(name, dtype, dora):
    layer = _layers()[name]
    pm = _peft(layer, dtype, dora=dora, rslora=name == "square")
    base_w = pm.base_model.model.layer.get_base_layer().weight.detach().clone()
    a, b, mag, _, s = _factors(pm)
    assert a.dtype == torch.float32  # PEFT's autocast_adapter_dtype: factors live in fp32 on a bf16 base
    kind = _kind(name)
    fifo = mm.fan_in_fan_out_from_shape(tuple(base_w.shape), tuple(a.shape), tuple(b.shape)) if kind == "linear" else False
    assert fifo == (name == "conv1d_gpt2")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged_peft = pm.merge_and_unload().layer.weight.detach()
    if dora:
        ours = mm.merge_dora(base_w, a, b, mag.detach(), s, kind=kind, fan_in_fan_out=fifo)
    else:
        ours = mm.merge_lora(base_w, a, b, s, kind=kind, fan_in_fan_out=bool(fifo))
        delta = mm.delta_weight(kind, a, b, s, tuple(base_w.shape), bool(fifo))
        assert delta.dtype == torch.float32 and delta.shape == base_w.shape
    assert ours.dtype == dtype and ours.shape == merged_peft.shape
    assert torch.equal(ours, merged_peft), (ours.float() - merged_peft.float()).abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_bias_matches_peft(dtype):
    pm = _peft(_layers()["linear"], dtype, lora_bias=True)
    lay = pm.base_model.model.layer
    w0, b0 = lay.get_base_layer().weight.detach().clone(), lay.get_base_layer().bias.detach().clone()
    a, b, _, bias_b, s = _factors(pm)
    merged = pm.merge_and_unload().layer
    assert torch.equal(mm.merge_lora(w0, a, b, s), merged.weight.detach())
    assert torch.equal(mm.merge_lora_bias(b0, bias_b.detach(), s), merged.bias.detach())


def test_conv3d_kernel_1x1xk_is_correct_where_peft_crashes():
    layer = nn.Conv3d(4, 6, (1, 1, 3))
    pm = _peft(layer, torch.float32)
    a, b, _, _, s = _factors(pm)
    w0 = pm.base_model.model.layer.get_base_layer().weight.detach().clone()
    with pytest.raises(RuntimeError):  # peft#3768 in 0.21.2; if this starts passing, PEFT fixed it
        copy.deepcopy(pm).merge_and_unload()
    ours = mm.merge_lora(w0, a, b, s, kind="conv")
    expect = w0 + (b.reshape(6, -1) @ a.reshape(a.shape[0], -1)).reshape(w0.shape) * s
    torch.testing.assert_close(ours, expect, rtol=0, atol=1e-6)
    x = torch.randn(2, 4, 3, 3, 7)
    conv = nn.Conv3d(4, 6, (1, 1, 3))
    with torch.no_grad():
        conv.weight.copy_(ours)
        conv.bias.copy_(pm.base_model.model.layer.get_base_layer().bias)
        torch.testing.assert_close(conv(x), pm(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["linear", "conv1d_gpt2", "embedding"])
def test_row_chunks_equal_whole_merge(name):
    g = torch.Generator().manual_seed(3)
    kind = _kind(name)
    rows, cols, r = 1000, 77, 16
    if kind == "embedding":
        a, b = torch.randn(r, rows, generator=g), torch.randn(cols, r, generator=g)
    elif name == "conv1d_gpt2":
        a, b = torch.randn(r, rows, generator=g), torch.randn(cols, r, generator=g)
    else:
        a, b = torch.randn(r, cols, generator=g), torch.randn(rows, r, generator=g)
    w = torch.randn(rows, cols, generator=g).to(torch.bfloat16)
    fifo = name == "conv1d_gpt2"
    whole = mm.merge_lora(w, a, b, 0.7, kind=kind, fan_in_fan_out=fifo)
    spans = mr.row_spans(rows, 130)
    assert spans[0] == (0, 130) and spans[-1][1] == rows and all(j - i >= mm.MIN_CHUNK_ROWS for i, j in spans)
    parts = [mr.lora_rows(w[i:j], i, j, a, b, 0.7, kind=kind, fan_in_fan_out=fifo) for i, j in spans]
    assert torch.equal(torch.cat(parts), whole)
    work, out = torch.empty(400 * cols), torch.empty(200 * cols, dtype=torch.bfloat16)  # reused buffers, as the merge does
    parts = [mr.lora_rows(w[i:j], i, j, a, b, 0.7, kind=kind, fan_in_fan_out=fifo, work=work, out=out).clone() for i, j in spans]
    assert torch.equal(torch.cat(parts), whole)
    assert mr.streams_by_rows(kind, fifo, dora=False) and not mr.streams_by_rows(kind, fifo, dora=True)


def test_bf16_rounds_once_and_embedding_rounds_like_peft():
    w = torch.tensor([[1.0, 1.0]], dtype=torch.bfloat16).repeat(4, 1)
    a, b = torch.full((1, 2), 1.0), torch.full((4, 1), 2.0**-8 + 2.0**-17)  # just above half an ulp of 1.0 in bf16
    linear = mm.merge_lora(w, a, b, 1.0)
    assert torch.all(linear == 1.0078125)  # fp32 sum rounds up once
    emb = mm.merge_lora(w.T.contiguous().T.contiguous(), b.T, a.T, 1.0, kind="embedding")  # ΔW rows are (B_e@A_e).T
    assert emb.shape == w.shape and emb.dtype == torch.bfloat16
    assert torch.all(emb == 1.0)  # PEFT rounds the delta to bf16 first (2^-8: a tie, to even)
    assert mm.merge_lora(w, a, b, 1.0, out_dtype=torch.float32).dtype == torch.float32


def test_replace_rows_and_fan_in_fan_out_from_shape():
    w = torch.zeros(5, 3, dtype=torch.bfloat16)
    rows = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    out = mm.replace_rows(w, [4, 1], rows)
    assert torch.equal(out[4].float(), rows[0]) and torch.equal(out[1].float(), rows[1]) and out[0].abs().sum() == 0
    assert mm.fan_in_fan_out_from_shape((8, 4), (2, 4), (8, 2)) is False
    assert mm.fan_in_fan_out_from_shape((4, 8), (2, 4), (8, 2)) is True
    assert mm.fan_in_fan_out_from_shape((4, 4), (2, 4), (4, 2), hint=True) is True
    assert mm.fan_in_fan_out_from_shape((5, 4), (2, 4), (8, 2)) is None


# --------------------------------------------------------------------------------------------------------------
# Row-chunked merges (merge_rows, re-exported by merge_math): conv LoRA/DoRA in one pass, bit for bit;
# DoRA on an Embedding / a Conv1D in two passes (column norms first), within the documented tolerance.

CONV_SHAPES = {
    "patch_embed": (1280, 3, 2, 14, 14),  # Qwen2-VL's vision patch_embed (Conv3d)
    "conv1d": (200, 6, 3),
    "conv2d": (257, 5, 3, 3),
    "conv2d_1x1": (300, 16, 1, 1),  # the squeeze-matmul branch of conv_delta
    "conv3d_1x1xk": (130, 4, 1, 1, 3),
}


def _conv_factors(shape, r=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = shape[2:]
    a = torch.randn((r, shape[1]) + k, generator=g) * 0.3
    b = torch.randn((shape[0], r) + (1,) * len(k), generator=g) * 0.3
    mag = torch.rand((1, shape[0]) + (1,) * len(k), generator=g) + 0.5  # PEFT's conv magnitude shape
    w = torch.randn(shape, generator=g) * 0.05
    return w, a, b, mag


@pytest.mark.parametrize("name", list(CONV_SHAPES))
def test_conv_rows_equal_whole_merge_bitwise(name):
    shape = CONV_SHAPES[name]
    w32, a, b, mag = _conv_factors(shape)
    assert mr.streams_by_rows("conv", False, dora=False) and mr.dora_streams_by_rows("conv", False)
    assert not mr.dora_needs_norm_pass("conv", False)
    row = math.prod(shape[1:])
    for wdt, odt in ((torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32), (torch.bfloat16, torch.float16)):
        w = w32.to(wdt)
        lora = mm.merge_lora(w, a, b, 0.7, kind="conv", out_dtype=odt)
        dora = mm.merge_dora(w, a, b, mag, 0.7, kind="conv", out_dtype=odt)
        for step in (mm.MIN_CHUNK_ROWS, 100, shape[0]):  # chunks at MIN_CHUNK_ROWS boundaries, odd ones, one
            spans = mr.row_spans(shape[0], step)
            work, out = torch.empty(2 * (step + 64) * row), torch.empty((step + 64) * row, dtype=odt)  # reused, as the merge does
            parts = [mr.lora_rows(w[i:j], i, j, a, b, 0.7, kind="conv", out_dtype=odt, work=work, out=out).clone() for i, j in spans]
            assert torch.equal(torch.cat(parts), lora), (name, wdt, step)
            dev = [mr._rows_on(torch.device("cpu"), w[i:j], i, j, a, b, 0.7, "conv", False, odt) for i, j in spans]
            assert torch.equal(torch.cat(dev), lora)  # the accelerator branch's sequence, run here
            # merge.py calls dora_rows without kind: a 3+-dim weight is a conv
            parts = [mr.dora_rows(w[i:j], i, j, a, b, mag, 0.7, out_dtype=odt) for i, j in spans]
            assert torch.equal(torch.cat(parts), dora), (name, wdt, step)


@pytest.mark.parametrize("name", ["conv1d", "conv2d", "conv2d_1x1", "conv3d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_conv_rows_match_peft_bitwise(name, dtype):
    out_ch = 150  # > 2 * MIN_CHUNK_ROWS: several chunks
    layer = {"conv1d": nn.Conv1d(6, out_ch, 3), "conv2d": nn.Conv2d(6, out_ch, (3, 3)),
             "conv2d_1x1": nn.Conv2d(8, out_ch, 1), "conv3d": nn.Conv3d(3, out_ch, (2, 3, 3))}[name]
    for dora in (False, True):
        pm = _peft(layer, dtype, dora=dora)
        base_w = pm.base_model.model.layer.get_base_layer().weight.detach().clone()
        a, b, mag, _, s = _factors(pm)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = pm.merge_and_unload().layer.weight.detach()
        spans = mr.row_spans(out_ch, 64)
        if dora:
            parts = [mr.dora_rows(base_w[i:j], i, j, a, b, mag.detach(), s, kind="conv") for i, j in spans]
        else:
            parts = [mr.lora_rows(base_w[i:j], i, j, a, b, s, kind="conv") for i, j in spans]
        assert len(spans) == 2 and torch.equal(torch.cat(parts), want), (name, dora)


def _ulps(x: torch.Tensor, y: torch.Tensor) -> int:
    iv = torch.int32 if x.dtype == torch.float32 else torch.int16
    return int((x.view(iv).long() - y.view(iv).long()).abs().max())


def _two_pass(w, a, b, mag, s, kind, fifo, odt, step):
    spans = mr.row_spans(w.shape[0], step)
    acc = None
    for i, j in spans:
        acc = mr.dora_norm_rows(acc, w[i:j], i, j, a, b, s, kind=kind, fan_in_fan_out=fifo)
    norms = mr.dora_norm_finish(acc)
    return norms, torch.cat([mr.dora_rows(w[i:j], i, j, a, b, mag, s, kind=kind, fan_in_fan_out=fifo, out_dtype=odt, norms=norms)
                             for i, j in spans])


def _within_two_pass_tolerance(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    if want.dtype == torch.float32:
        rel = ((got - want).abs() / want.abs().clamp_min(torch.finfo(torch.float32).tiny)).max()
        assert rel <= mr.DORA_TWO_PASS_REL_TOL, rel
    else:
        assert _ulps(got, want) <= 1


@pytest.mark.parametrize("kind,fifo,rows,cols", [("embedding", False, 20000, 64), ("linear", True, 1500, 96)],
                         ids=["embedding", "conv1d_gpt2"])
def test_two_pass_dora_rows_within_tolerance_of_whole(kind, fifo, rows, cols):
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(8, rows, generator=g) * 0.3, torch.randn(cols, 8, generator=g) * 0.3
    mag, w32 = torch.rand(cols, generator=g) + 0.5, torch.randn(rows, cols, generator=g) * 0.05
    assert mr.dora_needs_norm_pass(kind, fifo) and not mr.dora_streams_by_rows(kind, fifo)
    assert not mr.streams_by_rows(kind, fifo, dora=True)
    for wdt in (torch.bfloat16, torch.float32):
        w = w32.to(wdt)
        combined = w.float() + mm.delta_weight(kind, a, b, 0.7, (rows, cols), fifo)
        exact = torch.linalg.vector_norm(combined.double(), dim=0).float()  # the float64 norm, rounded once
        for step in (mm.MIN_CHUNK_ROWS, 777, rows):
            for odt in (torch.float32, torch.bfloat16, torch.float16):
                norms, got = _two_pass(w, a, b, mag, 0.7, kind, fifo, odt, step)
                assert _ulps(norms, exact) <= 1
                _within_two_pass_tolerance(got, mm.merge_dora(w, a, b, mag, 0.7, kind=kind, fan_in_fan_out=fifo, out_dtype=odt))


@pytest.mark.parametrize("name", ["embedding", "conv1d_gpt2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_two_pass_dora_matches_peft_within_tolerance(name, dtype):
    layer = nn.Embedding(300, 24) if name == "embedding" else Conv1D(40, 200)  # W (300, 24) / (200, 40): several chunks
    pm = _peft(layer, dtype, dora=True)
    base_w = pm.base_model.model.layer.get_base_layer().weight.detach().clone()
    a, b, mag, _, s = _factors(pm)
    kind, fifo = ("embedding", False) if name == "embedding" else ("linear", True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = pm.merge_and_unload().layer.weight.detach()
    for step in (64, 100):
        _, got = _two_pass(base_w, a, b, mag.detach(), s, kind, fifo, dtype, step)
        assert len(mr.row_spans(base_w.shape[0], step)) >= 2
        _within_two_pass_tolerance(got, want)


def test_two_pass_dora_refuses_without_norms_and_one_pass_kinds_have_no_norm_pass():
    w, a, b = torch.randn(128, 8), torch.randn(2, 128), torch.randn(8, 2)
    with pytest.raises(ValueError, match="norms="):
        mr.dora_rows(w[:64], 0, 64, a, b, torch.ones(8), 1.0, kind="embedding")
    with pytest.raises(ValueError, match="no norm pass"):
        mr.dora_norm_rows(None, w[:64], 0, 64, a.T, b.T, 1.0, kind="linear")
    assert not mr.dora_needs_norm_pass("linear", False) and not mr.dora_needs_norm_pass("conv", False)
    assert mr.dora_needs_norm_pass("linear", True) and mr.dora_needs_norm_pass("embedding", False)
