"""`qvl-ckpt recipes [list|show|check]`: tables for humans, one JSON object with --json, dry runs at any size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings

import pytest
import torch
from click.testing import CliRunner

from qvl_plugin.cli import main
from qvl_plugin.recipes import get_recipe
from qvl_plugin.recipes.check import check_recipe

from recipe_models import TinyQwenVL, build


def run(*args: str):
    result = CliRunner().invoke(main, list(args))
    return result


def jrun(*args: str) -> dict:
    result = run(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def save_config(model, path):
    path.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(path)  # config.json only: check never reads weights for these families
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe-models")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = {
            "qwen2-vl": save_config(build("qwen2-vl"), root / "qwen2-vl"),
            "qwen2.5-vl-tied": save_config(build("qwen2.5-vl", tied=True), root / "q25"),
        }
        from safetensors.torch import save_file

        v1 = root / "qwen-vl"
        v1.mkdir()
        model = TinyQwenVL().to(torch.bfloat16)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(v1 / "model.safetensors"), metadata={"format": "pt"})
        (v1 / "config.json").write_text(json.dumps({"architectures": ["QWenLMHeadModel"], "model_type": "qwen", "visual": {"width": 32},
                                                     "hidden_size": 64, "vocab_size": 256, "tie_word_embeddings": False}))
        out["qwen-vl"] = v1
        bare = root / "qwen-vl-bare"
        bare.mkdir()
        (bare / "config.json").write_text((v1 / "config.json").read_text())
        out["qwen-vl-bare"] = bare
    return out


def test_list_default_and_json():
    result = run("recipes")
    assert result.exit_code == 0 and "qwen2.5-vl/lora-embed-head" in result.output and "qvl-plugin" in result.output
    data = jrun("recipes")
    assert data == jrun("recipes", "list")
    row = next(r for r in data["recipes"] if r["name"] == "qwen-vl/lora-embed-head")
    assert set(row) == {"name", "family", "description", "distribution", "entry_point"} and row["family"] == "qwen-vl"


def test_show_with_set():
    data = jrun("recipes", "show", "qwen2-vl/lora", "--set", "r=8", "--set", "save=[adapter, merged]")
    assert data["r"] == 8 and data["save"] == ["adapter", "merged"] and data["family"] == "qwen2-vl"
    assert run("recipes", "show", "qwen-vl/lora-embed-head").exit_code == 0
    bad = run("recipes", "show", "qwen2-vl/lora", "--set", "rank=8")
    assert bad.exit_code == 1 and "did you mean: r?" in bad.output


def test_check_tiny_json(dirs):
    data = jrun("recipes", "check", "qwen2-vl/lora-embed-head", "--model", str(dirs["qwen2-vl"]))
    assert data["method"] == "meta" and data["family"] == "qwen2-vl" and not data["tied"]
    counts = {(p["kind"], p["pattern"]): p["count"] for p in data["patterns"]}
    assert counts[("module", "embed")] == counts[("module", "lm_head")] == 1
    n_layers = json.loads((dirs["qwen2-vl"] / "config.json").read_text())["text_config"]["num_hidden_layers"]
    assert sum(c for (k, _), c in counts.items() if k == "target") == n_layers * 7
    groups = {g["group"]: g for g in data["groups"]}
    assert groups["embedding"]["trainable"] == groups["embedding"]["total"] > 0
    assert groups["vision"]["trainable"] == 0
    assert data["adapter_bytes"] == data["pth_bytes"] == sum(g["nbytes"] for g in data["groups"])
    assert data["lora_config"]["modules_to_save"] == ["model.language_model.embed_tokens", "lm_head"]
    assert data["suggestions"] == []


def test_check_human_output_and_tied(dirs):
    result = run("recipes", "check", "qwen2.5-vl/lora-new-tokens", "--model", str(dirs["qwen2.5-vl-tied"]), "--set", "trainable_tokens=[1, 2]")
    assert result.exit_code == 0, result.output
    for text in ("qwen2.5-vl/lora-new-tokens", "tied embeddings", "matched modules", "trainable parameters", "saved adapter"):
        assert text in result.output


def test_check_recipe_file_and_errors(dirs, tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("recipe:\n  base: qwen2-vl/lora\n  r: 4\n  targets: ['model\\.language_model\\.layers\\.\\d+\\.self_attn\\.(q|v)_proj']\n")
    data = jrun("recipes", "check", str(f), "--model", str(dirs["qwen2-vl"]))
    n_layers = json.loads((dirs["qwen2-vl"] / "config.json").read_text())["text_config"]["num_hidden_layers"]
    assert [p["count"] for p in data["patterns"]] == [2 * n_layers] and data["lora_config"]["r"] == 4
    typo = run("recipes", "check", "qwen2-vl/lorra", "--model", str(dirs["qwen2-vl"]))
    assert typo.exit_code == 1 and "error: no recipe named 'qwen2-vl/lorra'" in typo.output
    template = run("recipes", "check", "qwen2-vl/lora-new-tokens", "--model", str(dirs["qwen2-vl"]))
    assert template.exit_code == 1 and "needs trainable_tokens" in template.output
    wrong = run("recipes", "check", "qwen3-vl/lora", "--model", str(dirs["qwen2-vl"]))
    assert wrong.exit_code == 1 and "is for qwen3-vl but the model is qwen2-vl" in wrong.output
    typo_t = run("recipes", "check", "qwen2-vl/lora", "--model", str(dirs["qwen2-vl"]), "--set", r"targets=['model\.language_model\.layers\.\d+\.mlp\.gate_prj']")
    assert typo_t.exit_code == 1 and "did you mean: model.language_model.layers.N.mlp.gate_proj" in typo_t.output


def test_check_qwen_vl_v1_from_keys(dirs):
    data = jrun("recipes", "check", "qwen-vl/lora-embed-head", "--model", str(dirs["qwen-vl"]))
    assert data["method"] == "keys" and data["family"] == "qwen-vl" and data["dtype"] == "bfloat16"
    assert [p["count"] for p in data["patterns"]] == [4, 4, 1, 1]
    lora = 64 * sum(i + o for i, o in [(64, 192), (64, 64), (64, 128), (64, 128)]) * 2  # r * (in+out), 2 layers
    whole = 2 * 256 * 64 * 2  # wte + lm_head in bf16
    assert data["adapter_bytes"] == data["pth_bytes"] == lora * 4 + whole
    bare = run("recipes", "check", "qwen-vl/lora", "--model", str(dirs["qwen-vl-bare"]))
    assert bare.exit_code == 1 and "reads the checkpoint's key names and shapes" in bare.output, bare.output


@pytest.mark.parametrize("family, tied", [("qwen2-vl", False), ("qwen2-vl", True), ("qwen3-vl", True)])
def test_key_estimate_equals_peft(tmp_path, family, tied):
    """The key/shape estimate (used for Qwen-VL v1) agrees with PEFT's own numbers on a meta model."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build(family, tied=tied).to(torch.bfloat16).save_pretrained(tmp_path)
    for name, changes in [("lora", {"use_dora": True}), ("lora-embed-head", {}), ("lora-embed-head", {"tied": "tie"}),
                          ("lora-new-tokens", {"trainable_tokens": [3, 5]}), ("lora-new-tokens", {"trainable_tokens": [3], "tied": "untie"})]:
        recipe = get_recipe(f"{family}/{name}").with_overrides(**changes)
        meta, keys = check_recipe(recipe, tmp_path, method="meta"), check_recipe(recipe, tmp_path, method="keys")
        assert (keys.adapter_bytes, keys.pth_bytes, keys.rows) == (meta.adapter_bytes, meta.pth_bytes, meta.rows), (name, changes)


QWEN2_VL_72B = {
    "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", "dtype": "bfloat16", "tie_word_embeddings": False,
    "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "text_config": {"model_type": "qwen2_vl_text", "hidden_size": 8192, "intermediate_size": 29568, "num_hidden_layers": 80,
                    "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 152064, "max_position_embeddings": 32768,
                    "rms_norm_eps": 1e-6, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "rope_theta": 1000000.0},
    "vision_config": {"depth": 32, "embed_dim": 1280, "hidden_size": 8192, "num_heads": 16, "mlp_ratio": 4, "patch_size": 14,
                      "spatial_merge_size": 2, "temporal_patch_size": 2, "in_chans": 3},
}


def test_check_72b_on_meta_in_seconds(tmp_path):
    """A Qwen2-VL-72B-sized config: no weights exist, the model is built on the meta device."""
    (tmp_path / "config.json").write_text(json.dumps(QWEN2_VL_72B))
    env = {k: v for k, v in os.environ.items() if k not in ("QVL_PLUGINS",)}
    code = ("import resource, sys\nfrom qvl_plugin.cli import main\ntry:\n    main()\nfinally:\n"
            "    print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code, "recipes", "check", "qwen2-vl/lora-embed-head", "--model", str(tmp_path), "--json"],
                          env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    maxrss_kb = int(proc.stderr.rsplit("MAXRSS", 1)[1].split()[0])
    assert elapsed < 60 and maxrss_kb < 2_000_000, (elapsed, maxrss_kb)
    lora_per_layer = 16 * sum(i + o for i, o in [(8192, 8192), (8192, 1024), (8192, 1024), (8192, 8192)] + [(8192, 29568)] * 3)
    embed = 152064 * 8192
    assert data["adapter_bytes"] == 80 * lora_per_layer * 4 + 2 * embed * 2  # LoRA fp32, embed + head copies bf16
    groups = {g["group"]: g for g in data["groups"]}
    assert groups["embedding"]["trainable"] == groups["head"]["trainable"] == embed
    assert 72e9 < data["total"] < 74e9
    assert data["suggestions"] and "trainable_tokens" in data["suggestions"][0]
