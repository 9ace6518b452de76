"""Qwen3-VL-MoE recipes: attention LoRA, expert LoRA (PEFT target_parameters, router frozen) and
embed/head; applied to a tiny real model and dry-run on the real Qwen3-VL-235B-A22B config (meta device)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qvl_plugin.recipes.apply import apply_recipe, trainable_report
from qvl_plugin.recipes.registry import get_recipe
from qvl_plugin.recipes.schema import Recipe, RecipeError
from tests.factories import MOE_FAMILY, build_model

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "qwen3-vl-235b-a22b"


@pytest.mark.parametrize("name,trained", [
    ("qwen3-vl-moe/lora", {"language"}),
    ("qwen3-vl-moe/lora-experts", {"language", "experts"}),
    ("qwen3-vl-moe/lora-embed-head", {"language", "embedding", "head"}),
])
def test_recipes_train_what_they_say(name, trained):
    pm = apply_recipe(build_model(MOE_FAMILY), name)
    rows = {r.group: r.trainable for r in trainable_report(pm)}
    assert {g for g, n in rows.items() if n} == trained
    assert rows["router"] == 0  # frozen unless asked
    if name.endswith("experts"):
        cfg = pm.peft_config["default"]
        assert sorted(cfg.target_parameters) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]


def test_router_only_when_asked_and_bad_parameter_names():
    r = get_recipe("qwen3-vl-moe/lora-experts").with_overrides(
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"])
    rows = {x.group: x.trainable for x in trainable_report(apply_recipe(build_model(MOE_FAMILY), r))}
    assert rows["router"] == 2 * 16 * (64 + 4)  # r·(in + out) per layer, 2 layers
    with pytest.raises(RecipeError, match="matches no parameter"):
        apply_recipe(build_model(MOE_FAMILY), r.with_overrides(target_parameters=["mlp.experts.up_proj"]))
    with pytest.raises(RecipeError, match="no regex"):
        Recipe(name="x/y", family=MOE_FAMILY, target_parameters=[".*experts.*"])


def test_check_235b_a22b_on_meta_fast():
    """`recipes check` on the real Qwen3-VL-235B-A22B config.json: the model on the meta device, < 30 s."""
    env = {k: v for k, v in os.environ.items() if k not in ("QVL_PLUGINS",)}
    out = {}
    for name in ("qwen3-vl-moe/lora", "qwen3-vl-moe/lora-experts"):
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-c", "from qvl_plugin.cli import main; main()", "recipes", "check", name, "--model", str(FIXTURE), "--json"],
                              env=env, capture_output=True, text=True, timeout=300)
        elapsed = time.monotonic() - start
        assert proc.returncode == 0, proc.stderr
        assert elapsed < 30, elapsed
        out[name] = json.loads(proc.stdout)
    layers, h, heads, kv, hd, e, inter, r = 94, 4096, 64, 4, 128, 128, 1536, 16
    attn = r * sum(i + o for i, o in [(h, heads * hd), (h, kv * hd), (h, kv * hd), (heads * hd, h)])
    experts = r * e * ((h + 2 * inter) + (inter + h))  # lora_A (r·E, in) + lora_B (out, r·E), both tensors
    lora, lx = out["qwen3-vl-moe/lora"], out["qwen3-vl-moe/lora-experts"]
    assert lora["family"] == MOE_FAMILY
    assert lora["adapter_bytes"] == lora["pth_bytes"] == layers * attn * 4
    assert lx["adapter_bytes"] == layers * (attn + experts) * 4
    groups = {g["group"]: g for g in lx["groups"]}
    assert groups["experts"]["trainable"] == layers * experts and groups["router"]["trainable"] == 0
    assert lx["total"] == 235_670_022_896  # the published parameter count of Qwen3-VL-235B-A22B
    assert lx["lora_config"]["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
