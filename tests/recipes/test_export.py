"""`qvl-ckpt recipes export`: host configurations whose trainable set equals apply_recipe's.

PEFT's export goes through the real ``get_peft_model``; axolotl's through the LoraConfig its ``load_lora``
builds from the same keys. LLaMA-Factory and ms-swift run for real in tests/external/test_host_*.py.
"""

from __future__ import annotations

import json
import warnings

import pytest
import yaml
from click.testing import CliRunner
from peft import LoraConfig, get_peft_model

from qvl_plugin.cli import main
from qvl_plugin.recipes import apply_recipe, get_recipe, list_recipes
from qvl_plugin.recipes.export import HOSTS, export_recipe
from tests.factories import build_model

FAMILIES = ("qwen-vl", "qwen2-vl", "qwen2.5-vl", "qwen3-vl", "qwen3-vl-moe")


def _recipe(name: str):
    r = get_recipe(name)
    return r.with_overrides(trainable_tokens=[3, 5]) if r.trainable_tokens == () else r


def _model(family: str, tied: bool):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_model(family, tied=tied)


def trainable(peft_model) -> set[str]:
    return {n for n, p in peft_model.named_parameters() if p.requires_grad}


def _wrap(model, config: LoraConfig):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, config)


def _cases():
    for info in list_recipes():
        for tied in (False, True):
            if info.family == "qwen-vl" and tied or info.family == "qwen3-vl-moe" and tied:
                continue
            yield pytest.param(info.name, tied, id=f"{info.name}-{'tied' if tied else 'untied'}")


@pytest.mark.parametrize("name,tied", list(_cases()))
def test_peft_export_trains_what_apply_recipe_trains(name, tied):
    recipe = _recipe(name)
    ours = trainable(apply_recipe(_model(recipe.family, tied), recipe))
    result = export_recipe(recipe, "peft", _model(recipe.family, tied))
    if not result.exact:  # only the untie policy on a tied model trained at the edges is beyond a LoraConfig
        assert tied and recipe.tied == "untie" and all(d.startswith("tied: untie") for d in result.differences)
        return
    config = LoraConfig(**{k: v for k, v in json.loads(result.render()).items() if k not in ("peft_type", "auto_mapping")})
    assert trainable(_wrap(_model(recipe.family, tied), config)) == ours


def _axolotl_lora_config(cfg: dict, causal_lm: bool) -> LoraConfig:
    """axolotl's loaders/adapter.py load_lora: the LoraConfig it builds from these keys."""
    assert cfg["adapter"] == "lora" and isinstance(cfg["lora_alpha"], int)
    kwargs = dict(r=cfg["lora_r"], lora_alpha=cfg["lora_alpha"], target_modules=cfg.get("lora_target_modules") or [],
                  lora_dropout=cfg["lora_dropout"], modules_to_save=cfg.get("lora_modules_to_save"), bias="none",
                  task_type="CAUSAL_LM" if causal_lm else None, target_parameters=cfg.get("lora_target_parameters"),
                  use_rslora=cfg.get("peft_use_rslora", False), use_dora=cfg.get("peft_use_dora", False))
    if cfg.get("peft_trainable_token_indices"):
        kwargs["trainable_token_indices"] = cfg["peft_trainable_token_indices"]
    if cfg.get("peft_ensure_weight_tying"):
        kwargs["ensure_weight_tying"] = True
    return LoraConfig(**{k: v for k, v in kwargs.items() if v is not None})


@pytest.mark.parametrize("name,tied", list(_cases()))
def test_axolotl_export_trains_what_apply_recipe_trains(name, tied):
    recipe = _recipe(name)
    result = export_recipe(recipe, "axolotl", _model(recipe.family, tied))
    if not result.exact:
        assert tied and recipe.tied == "untie" and all(d.startswith("tied: untie") for d in result.differences)
        return
    cfg = yaml.safe_load(result.render())
    ours = trainable(apply_recipe(_model(recipe.family, tied), recipe))
    model = _model(recipe.family, tied)
    assert trainable(_wrap(model, _axolotl_lora_config(cfg, hasattr(model, "prepare_inputs_for_generation")))) == ours


def _lf_targets(names, cfg, forbidden):
    """LLaMA-Factory 0.9.5 patch_target_modules: names containing a lora_target and no forbidden key."""
    targets = cfg["lora_target"].split(",")
    return {n for n in names if any(t in n for t in targets) and not any(f in n for f in forbidden)}


def test_llamafactory_substrings_pick_exactly_the_targets():
    """Vision LoRA on Qwen2.5-VL, whose vision MLP reuses gate/up/down_proj: bare leaf names would overreach."""
    recipe = get_recipe("qwen2.5-vl/lora").with_overrides(
        freeze=["merger"], vision_targets=[r"model\.visual\.blocks\.1\.mlp\.(gate|up)_proj"],
        targets=[r"model\.language_model\.layers\.\d+\.mlp\.(gate|down)_proj"])
    model = _model("qwen2.5-vl", False)
    cfg = export_recipe(recipe, "llamafactory", model).config
    assert cfg["freeze_vision_tower"] is False and cfg["freeze_multi_modal_projector"] is True
    names = [n for n, _ in model.named_modules()]
    plan_modules = {n for n in trainable(apply_recipe(_model("qwen2.5-vl", False), recipe))}
    got = _lf_targets(names, cfg, ["patch_embed", "visual.merger"])
    assert {n.removeprefix("base_model.model.").split(".lora_")[0] for n in plan_modules} == got


@pytest.mark.parametrize("host,recipe,tied,expect", [
    ("llamafactory", "qwen2-vl/lora-new-tokens", False, "trainable_tokens: LLaMA-Factory 0.9.5 cannot train only some rows"),
    ("swift", "qwen2-vl/lora-new-tokens", False, "trainable_tokens: ms-swift 4.6.0 cannot"),
    ("llamafactory", "qwen2-vl/lora-embed-head", True, "tied: untie: LLaMA-Factory 0.9.5 keeps"),
    ("axolotl", "qwen2-vl/lora-embed-head", True, "tied: untie: axolotl keeps"),
    ("llamafactory", "qwen3-vl-moe/lora-experts", False, "target_parameters: LLaMA-Factory 0.9.5 cannot"),
])
def test_what_a_host_cannot_say_is_a_difference(host, recipe, tied, expect):
    r = _recipe(recipe)
    result = export_recipe(r, host, _model(r.family, tied))
    assert any(d.startswith(expect) for d in result.differences), result.differences


def test_swift_unties_when_embedding_and_head_are_both_saved():
    result = export_recipe("qwen2-vl/lora-embed-head", "swift", _model("qwen2-vl", True))
    assert result.exact and result.config["modules_to_save"] == ["embed_tokens", "lm_head"]


def test_integer_alpha_hosts():
    r = get_recipe("qwen2-vl/lora").with_overrides(lora_alpha=12.5)
    for host in ("llamafactory", "axolotl"):
        assert any(d.startswith("lora_alpha:") for d in export_recipe(r, host, _model("qwen2-vl", False)).differences)
    assert export_recipe(r, "swift", _model("qwen2-vl", False)).config["lora_alpha"] == 12.5


def test_swift_shell_and_config_say_the_same():
    result = export_recipe("qwen2-vl/lora-embed-head", "swift", _model("qwen2-vl", False))
    line = result.render("shell")
    assert line.startswith("swift sft --tuner_type lora --target_regex '")
    assert "--modules_to_save embed_tokens lm_head" in line and "--freeze_vit true" in line
    assert yaml.safe_load(result.render("yaml")) == json.loads(result.render("json")) == result.config


# -- the command ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("export-model")
    _model("qwen2-vl", True).config.save_pretrained(path)
    return path


def run(*args):
    return CliRunner().invoke(main, ["recipes", "export", *map(str, args)])


def test_cli_writes_atomically_and_refuses_to_overwrite(tied_dir, tmp_path):
    out = tmp_path / "lf.yaml"
    res = run("qwen2-vl/lora", "--host", "llamafactory", "--model", tied_dir, "-o", out)
    assert res.exit_code == 0, res.output
    cfg = yaml.safe_load(out.read_text())
    assert cfg["lora_target"] == "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj" and cfg["lora_rank"] == 16
    res = run("qwen2-vl/lora", "--host", "llamafactory", "--model", tied_dir, "-o", out)
    assert res.exit_code == 1 and res.output.startswith("error:") and "already exists" in res.output
    assert run("qwen2-vl/lora", "--host", "axolotl", "--model", tied_dir, "-o", out, "--force").exit_code == 0
    assert "lora_target_modules" in out.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["lf.yaml"]


def test_cli_differences_write_nothing_unless_allowed(tied_dir, tmp_path):
    out = tmp_path / "lf.yaml"
    res = run("qwen2-vl/lora-embed-head", "--host", "llamafactory", "--model", tied_dir, "-o", out)
    lines = res.output.strip().splitlines()
    assert res.exit_code == 1 and not out.exists() and "Traceback" not in res.output
    assert lines[0].startswith("difference: tied: untie:") and lines[-1].startswith("error:") and len(lines) == 2
    res = run("qwen2-vl/lora-embed-head", "--host", "llamafactory", "--model", tied_dir, "-o", out, "--allow-approximate")
    assert res.exit_code == 0 and res.output.startswith("warning: tied: untie:")
    assert yaml.safe_load(out.read_text())["additional_target"] == "embed_tokens,lm_head"


def test_cli_peft_json_and_set(tied_dir):
    res = run("qwen2-vl/lora", "--host", "peft", "--model", tied_dir, "--set", "r=4")
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["r"] == 4 and data["target_modules"].startswith("(?:model\\.language_model")


@pytest.mark.parametrize("args,code,text", [
    (["qwen2-vl/lora", "--host", "nope"], 2, "Invalid value for '--host'"),
    (["qwen2-vl/lora"], 2, "Missing option '--host'"),
    (["qwen2-vl/lroa", "--host", "peft"], 1, "error: no recipe named 'qwen2-vl/lroa' (did you mean: qwen2-vl/lora"),
    (["qwen2-vl/lora", "--host", "llamafactory", "--format", "shell"], 1, "error: --format shell is not available for llamafactory"),
    (["qwen-vl/lora", "--host", "llamafactory"], 1, "error: LLaMA-Factory 0.9.5 does not support qwen-vl"),
    (["qwen2-vl/lora", "--host", "peft", "--set", "r=0"], 1, "error: recipe qwen2-vl/lora: r must be"),
])
def test_cli_bad_input_is_one_line(args, code, text, tied_dir):
    res = run(*args, *(["--model", tied_dir] if code == 1 and "lroa" not in args[0] and "qwen-vl" not in args[0] else []))
    assert res.exit_code == code, res.output
    assert text in res.output and "Traceback" not in res.output
    if code == 1:
        assert len(res.output.strip().splitlines()) == 1


def test_cli_model_of_another_family(tied_dir):
    res = run("qwen3-vl/lora", "--host", "swift", "--model", tied_dir)
    assert res.exit_code == 1 and "error: recipe qwen3-vl/lora is for qwen3-vl but the model is qwen2-vl" in res.output


def test_hosts_listed():
    assert HOSTS == ("llamafactory", "swift", "axolotl", "peft")


def test_cli_model_dir_without_config(tmp_path):
    res = run("qwen2-vl/lora", "--host", "swift", "--model", tmp_path)
    assert res.exit_code == 1 and res.output.strip() == f"error: {tmp_path}: no config.json (--model needs the model directory)"
