"""Layouts are data; these tests hold the data to what transformers actually does."""

from __future__ import annotations

from pathlib import Path

import pytest

from qvl_plugin.layouts import GENERIC, all_layouts, detect_layout, get_layout
from tests.factories import build_model, save_base

FAMILIES = ["qwen2-vl", "qwen2.5-vl", "qwen3-vl"]


@pytest.mark.parametrize("family", FAMILIES)
def test_in_memory_names_are_canonical_and_disk_names_map_to_them(family, tmp_path):
    from safetensors import safe_open

    model = build_model(family)
    layout = get_layout(family)
    memory = set(model.state_dict())
    assert all(layout.canonical(k) == k for k in memory)
    save_base(model, tmp_path / "base")
    with safe_open(str(tmp_path / "base" / "model.safetensors"), "pt") as f:
        disk = set(f.keys())
    assert {layout.canonical(k) for k in disk} <= memory
    # the family's on-disk naming round-trips
    assert {layout.disk(layout.canonical(k)) for k in disk} == disk


@pytest.mark.parametrize("family", FAMILIES)
def test_every_group_is_populated(family):
    model = build_model(family)
    layout = get_layout(family)
    modules = [n for n, _ in model.named_modules() if n]
    groups = {layout.group(m) for m in modules}
    assert {"embedding", "head", "language", "vision", "merger"} <= groups
    assert layout.embedding in modules and layout.head in modules


@pytest.mark.parametrize("family", FAMILIES)
def test_detect_from_config_and_from_keys(family):
    model = build_model(family)
    config = model.config.to_dict()
    assert detect_layout(config=config).name == family
    assert detect_layout(n for n, _ in model.named_modules()).name == family


def test_qwen_vl_v1_and_generic():
    assert detect_layout(["transformer.h.0.attn.c_attn", "transformer.wte"]).name == "qwen-vl"
    assert detect_layout(config={"model_type": "qwen", "architectures": ["QWenLMHeadModel"]}).name == "qwen-vl"
    assert detect_layout(["encoder.layer.0.dense"]) is GENERIC
    # a LoRA-only adapter does not reveal its generation: one shared family, same canonical names
    assert detect_layout(["model.layers.0.self_attn.q_proj"]).name == "qwen2-vl-family"
    v1 = get_layout("qwen-vl")
    assert v1.group("transformer.visual.attn_pool.kv_proj") == "merger"
    assert v1.group("transformer.visual.transformer.resblocks.0.mlp.c_fc") == "vision"
    assert v1.group("transformer.h.3.mlp.w1") == "language" and v1.layer_index("transformer.h.3.mlp.w1") == 3


def test_mapping_comes_from_transformers_where_it_exists():
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    rules = get_checkpoint_conversion_mapping("Qwen2VLForConditionalGeneration")
    expected = tuple((r.source_patterns[0], r.target_patterns[0]) for r in rules)
    assert get_layout("qwen2-vl").to_memory == expected
    assert {layout.name for layout in all_layouts()} >= {"qwen-vl", "qwen2-vl", "qwen2.5-vl", "qwen3-vl"}


def test_qwen3_vl_moe_layout_against_transformers(tmp_path):
    """model_type qwen3_vl_moe -> its own layout (not qwen3-vl); the experts' disk/memory transpose is the
    one transformers' conversion mapping applies, and a hub-layout file loads to the same model."""
    import json
    import subprocess
    import sys

    import torch
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    from tests.factories import MOE_EXPERTS, MOE_FAMILY, hub_layout_base

    model = build_model(MOE_FAMILY)
    layout = get_layout(MOE_FAMILY)
    assert detect_layout(config=model.config.to_dict()).name == MOE_FAMILY
    assert detect_layout(n for n, _ in model.named_modules()).name == MOE_FAMILY
    assert detect_layout(config=build_model("qwen3-vl").config.to_dict()).name == "qwen3-vl"
    assert detect_layout(hint="Qwen/Qwen3-VL-30B-A3B-Instruct").name == MOE_FAMILY
    groups = {layout.group(n) for n, _ in model.named_modules() if n}
    assert {"embedding", "head", "language", "experts", "router", "vision", "merger"} <= groups

    rules = get_checkpoint_conversion_mapping("qwen3_vl_moe")
    transposed = sorted(r.target_patterns[0] for r in rules if [type(o).__name__ for o in r.operations] == ["Transpose"])
    assert sorted(layout.transposed_on_disk) == sorted(MOE_EXPERTS) == transposed
    # the JSON (used when transformers is not imported) carries the same rule
    data = json.loads((Path(__import__("qvl_plugin.layouts").layouts.__file__).parent / "qwen3-vl-moe.json").read_text())
    assert sorted(data["transposed_on_disk"]) == transposed
    # PEFT nests ParamWrappers in the module's parameter registration order: the layout's order
    experts = model.model.language_model.layers[0].mlp.experts
    assert [n for n, _ in experts.named_parameters(recurse=False)] == list(layout.module_parameters("x.mlp.experts"))

    # transformers 5 saves memory layout; a hub file holds the transpose and loads to the same weights
    base = save_base(model, tmp_path / "base")
    hub = hub_layout_base(__import__("shutil").copytree(base, tmp_path / "hub"))
    with safe_open(str(hub / "model.safetensors"), "pt") as f:
        k = "model.language_model.layers.0.mlp.experts.gate_up_proj"
        assert tuple(f.get_slice(k).get_shape()) == (4, 64, 48)
    loaded = AutoModelForImageTextToText.from_pretrained(hub).eval()
    sd, ref = loaded.state_dict(), model.state_dict()
    assert all(torch.equal(sd[k], ref[k]) for k in ref)
