"""Streaming merge, acceptance: the merged dir loads with ``from_pretrained`` and reproduces the trained
PeftModel's logits (fp32, < 1e-4), for every family, tie setting, adapter layout and input format."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText

from qvl_plugin.ckpt.merge import merge, plan_merge
from tests.factories import ADAPTER_VARIANTS, build_model, load_qwen_vl, logits, make_adapter, make_dump, save_base

TOL = 1e-4
MTS = "linear-embed-head"  # LoRA on every language Linear + modules_to_save embed_tokens and lm_head


def _load(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForImageTextToText.from_pretrained(path).eval()


def _keys(path):
    keys = set()
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            keys |= set(h.keys())
    return keys


def _check(out, peft_model):
    merged = _load(out)
    diff = (logits(merged) - logits(peft_model)).abs().max().item()
    assert diff < TOL, diff
    return merged


@pytest.mark.parametrize("legacy", [False, True], ids=["new-layout", "legacy-layout"])
@pytest.mark.parametrize("family", ["qwen2_vl_base", "qwen2_vl_tied_base", "qwen25_vl_base", "qwen3_vl_base"])
def test_merge_reproduces_peft_logits(family, legacy, request, tmp_path):
    model, base = request.getfixturevalue(family)
    pm, adapter = make_adapter(model, ADAPTER_VARIANTS[MTS]("x"), tmp_path / "adapter", legacy=legacy)
    report = merge(adapter, base, tmp_path / "out")
    merged = _check(tmp_path / "out", pm)

    # the base's own on-disk keys (legacy hub layout for Qwen2/2.5-VL), plus lm_head when a tied base was untied
    base_keys = _keys(base)
    assert _keys(tmp_path / "out") == base_keys | set(report.added)
    tied = "tied" in family
    assert report.untied is tied and report.added == (["lm_head.weight"] if tied else [])
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and cfg["text_config"]["tie_word_embeddings"] is False
    assert merged.lm_head.weight.data_ptr() != merged.get_input_embeddings().weight.data_ptr()
    # non-weight files travel
    for name in ("generation_config.json", "chat_template.jinja", "tokenizer_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (base / name).read_bytes()
    assert report.counts["replaced"] == 2 and report.counts["lora"] == 14 and report.bytes_written > 0
    assert not [p for p in tmp_path.iterdir() if ".qvl-tmp-" in p.name]


def test_seed_style_dump_with_lora_alpha(qwen2_vl_tied_base, tmp_path):
    model, base = qwen2_vl_tied_base
    pm, _ = make_adapter(model, ADAPTER_VARIANTS[MTS]("x"))
    dump = make_dump(pm, tmp_path / "lora.pth")
    seen = []
    report = merge(dump, base, tmp_path / "out", lora_alpha=8, progress=lambda done, total: seen.append((done, total)))
    _check(tmp_path / "out", pm)
    assert report.untied and seen[-1][0] == seen[-1][1] and len(seen) == report.counts["tensors"]
    assert all(a <= b for (a, _), (b, _) in zip(seen, seen[1:]))


def test_dump_with_adapter_config_patterns(qwen2_vl_base, tmp_path):
    """rsLoRA + rank/alpha patterns in a .pth dump: the settings come from --adapter-config."""
    model, base = qwen2_vl_base
    pm, adapter = make_adapter(model, ADAPTER_VARIANTS["rslora-patterns"]("x"), tmp_path / "a")
    dump = make_dump(pm, tmp_path / "lora.pth")
    merge(dump, base, tmp_path / "out", adapter_config=adapter / "adapter_config.json")
    _check(tmp_path / "out", pm)


def test_sharded_base_and_output_bf16_equal_peft_bitwise(qwen2_vl_base, tmp_path, monkeypatch):
    """bf16 base: the merged tensors equal PEFT's merge_and_unload bit for bit; sharding like save_pretrained.

    Row chunks of 64 rows, so the embedding (256 rows) and the MLP weights stream in several chunks."""
    import qvl_plugin.ckpt.merge as merge_module

    monkeypatch.setattr(merge_module, "CHUNK_ELEMENTS", 64 * 64)
    model, _ = qwen2_vl_base
    bf16 = build_model("qwen2-vl").to(torch.bfloat16)
    base = save_base(bf16, tmp_path / "base", max_shard_size="40KB")
    assert (base / "model.safetensors.index.json").is_file()
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "embed_tokens"], modules_to_save=["lm_head"])
    pm, adapter = make_adapter(bf16, cfg, tmp_path / "a")
    report = merge(adapter, base, tmp_path / "out", max_shard_size="30KB")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(report.files) > 1 and set(index["weight_map"].values()) == set(report.files)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in load_file_all(tmp_path / "out").values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expect = pm.merge_and_unload().state_dict()
    got = _load(tmp_path / "out").state_dict()
    assert set(got) == set(expect)
    bad = [k for k in expect if got[k].dtype != torch.bfloat16 or not torch.equal(got[k], expect[k])]
    assert bad == []


def load_file_all(path):
    out = {}
    for f in path.glob("*.safetensors"):
        out.update(load_file(str(f)))
    return out


def test_qwen_vl_v1_matches_peft_merged_tensors(qwen_vl_base, tmp_path):
    model, base = qwen_vl_base
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "attn.c_proj", "w1", "w2", "in_proj", "conv1"], modules_to_save=["wte", "lm_head"])
    pm, adapter = make_adapter(model, cfg, tmp_path / "a")
    report = merge(adapter, base, tmp_path / "out")
    assert (tmp_path / "out" / "modeling_qwen.py").is_file() and report.untied is False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expect = pm.merge_and_unload().state_dict()
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(got) == set(expect)
    assert [k for k in expect if not torch.equal(got[k], expect[k])] == []
    merged = load_qwen_vl(tmp_path / "out")
    assert (logits(merged) - logits(pm)).abs().max() < TOL


def test_base_in_new_layout_keeps_its_naming(qwen2_vl_base, tmp_path):
    """A Qwen2-VL base saved with in-memory names (model.language_model.*): legacy adapter onto it."""
    model, base = qwen2_vl_base
    new = tmp_path / "base-new"
    new.mkdir()
    for f in base.iterdir():
        if f.suffix != ".safetensors":
            (new / f.name).write_bytes(f.read_bytes())
    sd = load_file(str(base / "model.safetensors"))
    renamed = {("model.language_model." + k[6:] if k.startswith("model.") else "model." + k if k.startswith("visual.") else k): v for k, v in sd.items()}
    save_file(renamed, str(new / "model.safetensors"), metadata={"format": "pt"})
    pm, adapter = make_adapter(model, ADAPTER_VARIANTS[MTS]("x"), tmp_path / "a", legacy=True)
    merge(adapter, new, tmp_path / "out")
    assert _keys(tmp_path / "out") == set(renamed)
    _check(tmp_path / "out", pm)


def test_dtype_option_and_plan_is_header_only(qwen2_vl_base, tmp_path):
    model, base = qwen2_vl_base
    pm, adapter = make_adapter(model, ADAPTER_VARIANTS["qv"]("x"), tmp_path / "a")
    with plan_merge(adapter, base, dtype="bf16") as plan:
        assert {t.dtype for t in plan.tensors} == {torch.bfloat16}
        assert plan.counts()["lora"] == 4 and plan.counts()["unchanged"] == len(plan.tensors) - 4
    merge(adapter, base, tmp_path / "out", dtype="bf16")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16"
    merged = _load(tmp_path / "out")
    assert merged.lm_head.weight.dtype == torch.bfloat16
    assert (logits(merged.float()) - logits(pm)).abs().max() < 0.05


def test_bin_base_and_untouched_config(qwen2_vl_base, tmp_path):
    """A ``pytorch_model.bin`` base (read with weights_only + mmap) gives a safetensors output."""
    model, base = qwen2_vl_base
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    pm, adapter = make_adapter(model, ADAPTER_VARIANTS["tokens"]("x"), tmp_path / "a")
    report = merge(adapter, tmp_path / "bin", tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").is_file() and not list((tmp_path / "out").glob("*.bin"))
    assert (tmp_path / "out" / "config.json").read_bytes() == (tmp_path / "bin" / "config.json").read_bytes()
    assert report.counts["token_rows"] == 1
    _check(tmp_path / "out", pm)
