"""Every adapter variant merges like PEFT, and tied embeddings follow the trained (unmerged) model."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import LoraConfig, TrainableTokensConfig
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText

from qvl_plugin.ckpt.merge import merge
from tests.factories import ADAPTER_VARIANTS, logits, make_adapter, small_merge_chunks

TOL = 1e-4


def _load(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForImageTextToText.from_pretrained(path).eval()


def _peft_merged(pm):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pm.merge_and_unload()


def _keys(path):
    with safe_open(str(path / "model.safetensors"), "pt") as h:
        return set(h.keys())


def _tie(path):
    cfg = json.loads((path / "config.json").read_text())
    return cfg["tie_word_embeddings"], cfg["text_config"]["tie_word_embeddings"]


VARIANTS = ["rslora-patterns", "dora", "embedding-lora", "conv-lora", "lora-bias", "bias-all", "tokens", "tokens-dict", "vision-full-path"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_equals_peft_merge_untied(variant, qwen2_vl_base, tmp_path):
    """Untied base: PEFT's merge_and_unload is faithful here, and ours equals it tensor for tensor."""
    model, base = qwen2_vl_base
    pm, adapter = make_adapter(model, ADAPTER_VARIANTS[variant]("qwen2-vl"), tmp_path / "a")
    expect_logits = logits(pm)
    report = merge(adapter, base, tmp_path / "out")
    merged = _load(tmp_path / "out")
    assert (logits(merged) - expect_logits).abs().max() < TOL
    expect = _peft_merged(pm).state_dict()
    got = merged.state_dict()
    assert [k for k in expect if not torch.equal(got[k], expect[k])] == []
    assert report.counts["unchanged"] < report.counts["tensors"] and not report.untied


def test_dora_on_embedding_and_saved_base_layer(qwen2_vl_base, tmp_path):
    model, base = qwen2_vl_base
    cfg = LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "embed_tokens"])
    pm, adapter = make_adapter(model, cfg, tmp_path / "a")
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as h:
        assert any(k.endswith("embed_tokens.base_layer.weight") for k in h.keys())  # replacement, then DoRA on top
    report = merge(adapter, base, tmp_path / "out")
    assert report.counts["dora"] == 5 and report.counts["replaced"] == 1
    merged = _load(tmp_path / "out")
    expect = _peft_merged(pm).state_dict()
    assert [k for k, v in merged.state_dict().items() if not torch.equal(v, expect[k])] == []


def test_dora_on_embedding_larger_than_a_chunk_merges_in_two_passes(qwen2_vl_base, tmp_path, monkeypatch):
    """DoRA on an embedding bigger than one row chunk: column norms first (float64), then rows. Within the
    documented tolerance of PEFT's whole-tensor merge, every other tensor bit-identical, the logits PEFT's."""
    from qvl_plugin.ckpt import merge_rows as mr

    model, base = qwen2_vl_base
    cfg = LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "embed_tokens"])
    pm, adapter = make_adapter(model, cfg, tmp_path / "a")
    calls = small_merge_chunks(monkeypatch, counted="dora_norm_rows")  # the tiny embedding spans several chunks
    report = merge(adapter, base, tmp_path / "out", device="cpu")
    assert calls["n"] > 1 and any("two passes" in n and "embed_tokens" in n for n in report.notes)
    merged, expect = _load(tmp_path / "out").state_dict(), _peft_merged(pm).state_dict()
    emb = [k for k in expect if k.endswith("embed_tokens.weight")]
    assert [k for k in expect if k not in emb and not torch.equal(merged[k], expect[k])] == []
    for k in emb:
        torch.testing.assert_close(merged[k], expect[k], rtol=mr.DORA_TWO_PASS_REL_TOL, atol=0)
    torch.testing.assert_close(logits(_load(tmp_path / "out")), logits(pm), rtol=TOL, atol=TOL)


# -- tied bases ----------------------------------------------------------------------------------------------


def test_tied_embedding_lora_follows_trained_model_not_peft_merge(qwen2_vl_tied_base, tmp_path):
    """LoRA on a tied embedding: the trained model's head is the *base* embedding (PEFT 0.21 merges it in)."""
    model, base = qwen2_vl_tied_base
    pm, adapter = make_adapter(model, ADAPTER_VARIANTS["embedding-lora"]("x"), tmp_path / "a")
    expect = logits(pm)
    report = merge(adapter, base, tmp_path / "out")
    assert report.untied and report.added == ["lm_head.weight"]
    assert _tie(tmp_path / "out") == (False, False)
    merged = _load(tmp_path / "out")
    assert (logits(merged) - expect).abs().max() < TOL
    base_embed = load_file(str(base / "model.safetensors"))["model.embed_tokens.weight"]
    assert torch.equal(merged.lm_head.weight, base_embed)
    peft_merged = _peft_merged(pm)
    assert (logits(peft_merged) - expect).abs().max() > 1e-3  # PEFT's own merge changes the head


def test_tied_ensure_weight_tying_keeps_the_tie(qwen2_vl_tied_base, tmp_path):
    model, base = qwen2_vl_tied_base
    for name, cfg in {
        "mts": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"], ensure_weight_tying=True),
        "emb-lora": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"], ensure_weight_tying=True),
        "tokens": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], trainable_token_indices=[3, 5, 7]),
    }.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm, adapter = make_adapter(model, cfg, tmp_path / name)
        out = tmp_path / f"out-{name}"
        report = merge(adapter, base, out)
        assert not report.untied, name
        assert _keys(out) == _keys(base) and _tie(out) == (True, True)
        merged = _load(out)
        assert merged.lm_head.weight.data_ptr() == merged.get_input_embeddings().weight.data_ptr()
        assert (logits(merged) - logits(pm)).abs().max() < TOL, name


def test_tied_mts_embed_only_and_trainable_tokens_method(qwen2_vl_tied_base, tmp_path):
    model, base = qwen2_vl_tied_base
    cases = {
        "embed-only": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["embed_tokens"]),
        "head-only": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]),
        "tt-method": TrainableTokensConfig(target_modules=["embed_tokens"], token_indices=[4, 9]),
    }
    for name, cfg in cases.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm, adapter = make_adapter(model, cfg, tmp_path / name)
        out = tmp_path / f"out-{name}"
        report = merge(adapter, base, out)
        assert report.untied is (name != "tt-method"), name
        assert (logits(_load(out)) - logits(pm)).abs().max() < TOL, name


def test_tied_base_file_with_both_tensors(qwen3_vl_base, tmp_path):
    """Qwen3-VL-2B style: tied in config, yet the file holds lm_head.weight too."""
    from tests.factories import build_model, save_base

    model = build_model("qwen3-vl", tied=True)
    base = save_base(model, tmp_path / "base")
    sd = load_file(str(base / "model.safetensors"))
    sd["lm_head.weight"] = sd["model.language_model.embed_tokens.weight"].clone()
    save_file(sd, str(base / "model.safetensors"), metadata={"format": "pt"})
    pm, adapter = make_adapter(model, ADAPTER_VARIANTS["qv"]("x"), tmp_path / "qv")
    merge(adapter, base, tmp_path / "out-qv")
    assert _keys(tmp_path / "out-qv") == set(sd) and _tie(tmp_path / "out-qv") == (True, True)
    assert (logits(_load(tmp_path / "out-qv")) - logits(pm)).abs().max() < TOL
    pm, adapter = make_adapter(model, ADAPTER_VARIANTS["rslora-patterns"]("x"), tmp_path / "head")
    report = merge(adapter, base, tmp_path / "out-head")
    assert report.untied and report.added == [] and _tie(tmp_path / "out-head") == (False, False)
    assert (logits(_load(tmp_path / "out-head")) - logits(pm)).abs().max() < TOL
