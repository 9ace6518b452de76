"""The lazy view: what it reports must equal what was made, for every format and layout."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from peft import LoraConfig
from safetensors import safe_open

from qvl_plugin.ckpt import Role, open_checkpoint
from qvl_plugin.ckpt.inspect import summarize
from qvl_plugin.errors import CheckpointError, UnsafeCheckpointError
from tests.factories import build_model, make_adapter, make_dump, save_base

QV = ["q_proj", "v_proj"]


def _keys(path):
    with safe_open(str(path), "pt") as f:
        return set(f.keys())


def test_merged_base_single_sharded_bin_and_bare_file(qwen2_vl_tied_base, tmp_path):
    model, base = qwen2_vl_tied_base
    single = open_checkpoint(base)
    assert single.format == "merged" and single.layout.name == "qwen2-vl"
    assert {e.key for e in single} == _keys(base / "model.safetensors")
    assert all(e.role is Role.BASE for e in single)
    # canonical names are the in-memory ones, whatever the file says
    assert {e.target for e in single} <= set(model.state_dict())
    assert single.tie_word_embeddings is True

    save_base(model, tmp_path / "sharded", max_shard_size="100KB")
    sharded = open_checkpoint(tmp_path / "sharded")
    assert len(sharded.files) > 1
    assert {(e.target, e.shape, e.dtype) for e in sharded} == {(e.target, e.shape, e.dtype) for e in single}

    model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    binary = open_checkpoint(tmp_path / "bin")
    assert {e.target for e in binary} == {e.target for e in single}
    e = next(e for e in binary if e.target.endswith("embed_tokens.weight"))
    assert torch.equal(e.load(), next(x for x in single if x.target == e.target).load())

    bare = open_checkpoint(base / "model.safetensors")
    assert bare.format == "merged" and len(bare) == len(single)


def test_peft_adapter_roles_and_names(qwen2_vl_tied_base, tmp_path):
    model, _ = qwen2_vl_tied_base
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=QV, modules_to_save=["embed_tokens", "lm_head"])
    peft_model, path = make_adapter(model, cfg, tmp_path / "a")
    ckpt = open_checkpoint(path)
    assert ckpt.format == "peft" and ckpt.layout.name.startswith("qwen2-vl")
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert len(ckpt) == len(trainable)
    roles = {e.role for e in ckpt}
    assert roles == {Role.LORA_A, Role.LORA_B, Role.FULL}
    assert {e.target for e in ckpt if e.role is Role.FULL} == {"lm_head.weight", "model.language_model.embed_tokens.weight"}
    # values come back exactly
    e = next(e for e in ckpt if e.role is Role.LORA_B)
    mem = dict(peft_model.named_parameters())[f"base_model.model.{e.module}.lora_B.default.weight"]
    assert torch.equal(e.load(), mem.detach())


def test_dump_is_deduplicated_and_names_match_adapter(qwen2_vl_tied_base, tmp_path):
    model, _ = qwen2_vl_tied_base
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=QV, modules_to_save=["embed_tokens", "lm_head"])
    peft_model, path = make_adapter(model, cfg, tmp_path / "a")
    make_dump(peft_model, tmp_path / "dump.pth")
    raw = torch.load(tmp_path / "dump.pth", weights_only=True)
    dump = open_checkpoint(tmp_path / "dump.pth")
    adapter = open_checkpoint(path)
    assert len(raw) == 2 * len(dump)
    assert dump.format == "pth" and dump.adapter is None
    codes = {f.code for f in dump.findings}
    assert "duplicate-key" in codes
    assert {(e.target, e.role) for e in dump} == {(e.target, e.role) for e in adapter}
    for a, b in zip(sorted(dump, key=lambda e: (e.target, e.role)), sorted(adapter, key=lambda e: (e.target, e.role))):
        assert torch.equal(a.load(), b.load())


def test_legacy_adapter_maps_to_the_same_canonical_names(qwen2_vl_base, tmp_path):
    model, _ = qwen2_vl_base
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=QV, modules_to_save=["lm_head"])
    _, new = make_adapter(model, cfg, tmp_path / "new")
    _, old = make_adapter(model, cfg, tmp_path / "old", legacy=True)
    a, b = open_checkpoint(new), open_checkpoint(old)
    assert {e.key for e in a} != {e.key for e in b}
    assert {e.target for e in a} == {e.target for e in b}
    assert "legacy-layout" in {f.code for f in b.findings}
    assert "legacy-layout" not in {f.code for f in a.findings}


@pytest.mark.parametrize(
    "kwargs, expect",
    [
        (dict(r=4, lora_alpha=16, use_rslora=True, target_modules=QV, rank_pattern={"q_proj": 8}), {"rank": "per-module", "use_rslora": True}),
        (dict(r=4, lora_alpha=8, use_dora=True, target_modules=QV), {"rank": 4, "use_dora": True}),
        (dict(r=4, lora_alpha=8, target_modules=["embed_tokens"]), {"rank": 4, "roles": {"lora_embedding_A", "lora_embedding_B"}}),
        (dict(r=4, lora_alpha=8, target_modules=QV, trainable_token_indices=[3, 5, 7]), {"tokens": [3, 5, 7]}),
        (dict(r=4, lora_alpha=8, target_modules=QV, lora_bias=True), {"roles": {"lora_bias"}}),
        (dict(r=4, lora_alpha=8, target_modules=QV, bias="all"), {"roles": {"bias"}}),
    ],
    ids=["rslora-patterns", "dora", "embedding-lora", "token-rows", "lora-bias", "bias-all"],
)
def test_inspect_reports_variants(qwen2_vl_base, tmp_path, kwargs, expect):
    model, _ = qwen2_vl_base
    _, path = make_adapter(model, LoraConfig(**kwargs), tmp_path / "a")
    info = summarize(open_checkpoint(path))
    lora = info["lora"]
    if expect.get("rank") == "per-module":
        assert isinstance(lora["rank"], dict) and set(lora["rank"].values()) == {4, 8}
        scal = lora["scaling"]
        assert isinstance(scal, dict) and pytest.approx(16 / 8**0.5) in list(scal.values())
    elif "rank" in expect:
        assert lora["rank"] == expect["rank"]
    for flag in ("use_dora", "use_rslora"):
        if flag in expect:
            assert lora[flag] is expect[flag]
    if "roles" in expect:
        assert expect["roles"] <= set(info["roles"])
    if "tokens" in expect:
        assert list(info["trainable_token_indices"].values()) == [expect["tokens"]]
        assert list(info["trainable_token_indices"]) == ["model.language_model.embed_tokens"]


def test_inspect_json_contract(qwen2_vl_tied_base, tmp_path):
    model, _ = qwen2_vl_tied_base
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=QV, modules_to_save=["embed_tokens", "lm_head"])
    peft_model, path = make_adapter(model, cfg, tmp_path / "a")
    info = summarize(open_checkpoint(path))
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert info["format"] == "peft" and info["num_tensors"] == len(trainable) == 10
    assert info["total_bytes"] == sum(p.numel() * p.element_size() for p in trainable)
    assert info["lora"] == {**info["lora"], "rank": 4, "alpha": 8.0, "target_modules": QV, "use_dora": False, "use_rslora": False}
    assert info["modules_to_save"] == ["lm_head", "model.language_model.embed_tokens"]
    assert info["trainable_token_indices"] is None
    assert all(set(f) >= {"code", "severity", "message"} for f in info["findings"])
    json.dumps(info)


def test_inspect_reads_no_tensor_data(qwen2_vl_base, tmp_path):
    model, base = qwen2_vl_base

    def boom():
        raise AssertionError("inspect must not read tensor data")

    ckpt = open_checkpoint(base)
    ckpt.entries = [dataclasses.replace(e, _load=boom) for e in ckpt.entries]
    assert summarize(ckpt)["num_tensors"] == len(ckpt)


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen3-vl"])
def test_other_generations(family, tmp_path):
    model = build_model(family)
    save_base(model, tmp_path / "base")
    base = open_checkpoint(tmp_path / "base")
    assert base.layout.name == family
    groups = summarize(base)["groups"]
    assert {"embedding", "language", "vision", "merger"} <= set(groups)
    _, path = make_adapter(model, LoraConfig(r=2, lora_alpha=4, target_modules=r".*language_model.*\.(q_proj|v_proj)", modules_to_save=["lm_head"]), tmp_path / "a")
    info = summarize(open_checkpoint(path))
    assert info["lora"]["target_modules"] == QV and info["modules_to_save"] == ["lm_head"]


def test_qwen_vl_v1(qwen_vl_base, tmp_path):
    model, base = qwen_vl_base
    ckpt = open_checkpoint(base)
    assert ckpt.layout.name == "qwen-vl"
    cfg = LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn", "attn.c_proj", "w1", "w2"], modules_to_save=["wte", "lm_head"])
    _, path = make_adapter(model, cfg, tmp_path / "a")
    info = summarize(open_checkpoint(path))
    assert info["layout"] == "qwen-vl"
    # v1 also has mlp.c_proj and the vision tower's c_proj: the target is named so that it names only itself
    assert set(info["lora"]["target_modules"]) == {"c_attn", "attn.c_proj", "w1", "w2"}
    assert info["modules_to_save"] == ["lm_head", "transformer.wte"]
    n_layers = len(model.transformer.h)
    assert info["groups"]["language"]["roles"] == {"lora_A": 4 * n_layers, "lora_B": 4 * n_layers}
    assert info["groups"]["embedding"]["roles"] == {"full": 1} and info["groups"]["head"]["roles"] == {"full": 1}


def test_unknown_model_opens_with_generic_layout(tmp_path):
    from safetensors.torch import save_file

    save_file({"encoder.layer.0.dense.weight": torch.zeros(2, 2)}, tmp_path / "x.safetensors")
    ckpt = open_checkpoint(tmp_path / "x.safetensors")
    assert ckpt.layout.name == "unknown" and summarize(ckpt)["groups"]["other"]["tensors"] == 1


def test_bad_inputs_raise_typed_errors(tmp_path):
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    with pytest.raises(CheckpointError):
        open_checkpoint(tmp_path / "notes.pth")
    with pytest.raises(CheckpointError):
        open_checkpoint(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.ones(64, 64)}, tmp_path / "t.safetensors")
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    with pytest.raises(UnsafeCheckpointError):
        open_checkpoint(tmp_path / "cut.safetensors")
