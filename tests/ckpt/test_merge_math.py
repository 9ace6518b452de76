"""merge_math against PEFT's own layers: the same bits as ``merge_and_unload`` for every layer kind."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from qvl_plugin.ckpt import merge_math as mm


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
    spans = mm.row_spans(rows, 130)
    assert spans[0] == (0, 130) and spans[-1][1] == rows and all(j - i >= mm.MIN_CHUNK_ROWS for i, j in spans)
    parts = [mm.lora_rows(w[i:j], i, j, a, b, 0.7, kind=kind, fan_in_fan_out=fifo) for i, j in spans]
    assert torch.equal(torch.cat(parts), whole)
    work, out = torch.empty(400 * cols), torch.empty(200 * cols, dtype=torch.bfloat16)  # reused buffers, as the merge does
    parts = [mm.lora_rows(w[i:j], i, j, a, b, 0.7, kind=kind, fan_in_fan_out=fifo, work=work, out=out).clone() for i, j in spans]
    assert torch.equal(torch.cat(parts), whole)
    assert mm.streams_by_rows(kind, fifo, dora=False) and not mm.streams_by_rows(kind, fifo, dora=True)


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
