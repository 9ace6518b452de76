"""Run dirs (real HF Trainer checkpoints laid out as LLaMA-Factory / ms-swift leave them) and hub ids
from a real local Hugging Face cache: every command resolves them through ckpt.sources (issue 11)."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from click.testing import CliRunner
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file, save_file

from qvl_plugin.ckpt.run_dir import list_checkpoints
from qvl_plugin.ckpt.sources import resolve_source
from qvl_plugin.cli import main
from qvl_plugin.errors import CheckpointError
from tests.factories import build_model, logits, make_adapter, mm_inputs
from tests.hub_cache import add_to_cache
from tests.run_dirs import as_llamafactory, as_swift, swift_lora_llm_save, trainer_run

MTS = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])


def run(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


@pytest.fixture(scope="module")
def swift_run(qwen2_vl_base, tmp_path_factory):
    model, base = qwen2_vl_base
    out = tmp_path_factory.mktemp("swift") / "output"
    pm, _ = trainer_run(model, MTS, out, steps=3)
    return dict(out=as_swift(out, pm, base, newest=3), pm=pm, base=base)


def _merged_logits(path):
    from transformers import AutoModelForImageTextToText

    return logits(AutoModelForImageTextToText.from_pretrained(path).eval())


def test_swift_run_dir_is_listed_and_every_command_uses_the_newest_checkpoint(swift_run, tmp_path):
    out, base = swift_run["out"], swift_run["base"]
    infos = list_checkpoints(out)
    assert [(i.name, i.kind, i.step) for i in infos] == [
        ("checkpoint-3", "checkpoint", 3), ("checkpoint-2", "checkpoint", 2), ("checkpoint-1", "checkpoint", 1), ("checkpoint-3-merged", "export", 3)]
    assert infos[0].last and all(i.complete for i in infos)
    src = resolve_source(out)
    assert src.path == out / "checkpoint-3" and "checkpoint-3 (step 3)" in src.note
    res = run("ls", out, "--json")
    data = json.loads(res.output)
    assert res.exit_code == 0 and data["newest_complete"] == "checkpoint-3" and data["checkpoints"][0]["last_checkpoint"]
    res = run("inspect", out)  # "directory has neither adapter_config.json nor config.json/weights" before
    assert res.exit_code == 0 and "using checkpoint-3" in res.output
    res = run("merge", out, "--base", base, "-o", tmp_path / "m")
    assert res.exit_code == 0, res.output
    assert (_merged_logits(tmp_path / "m") - logits(swift_run["pm"])).abs().max() < 1e-5
    assert run("diff", tmp_path / "m", out / "checkpoint-3-merged", "--atol", "1e-6").exit_code == 0
    assert run("audit", out, "--base", base).exit_code == 0


def test_incomplete_newest_checkpoints_are_skipped_and_reported(swift_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(swift_run["out"], out, symlinks=True)
    f3 = out / "checkpoint-3" / "adapter_model.safetensors"
    f3.write_bytes(f3.read_bytes()[:-100])  # truncated (a killed save)
    f2 = out / "checkpoint-2" / "adapter_model.safetensors"
    save_file({k: torch.empty(0) for k in load_file(str(f2))}, str(f2))  # ZeRO-3 without gathering
    (out / "checkpoint-1" / "adapter_model.safetensors").unlink()
    (out / "checkpoint-0").mkdir()
    shutil.copytree(swift_run["out"] / "checkpoint-1", out / "checkpoint-0", dirs_exist_ok=True)
    (out / "checkpoint-0" / "trainer_state.json").write_text(json.dumps({"global_step": 0}))
    infos = {i.name: i for i in list_checkpoints(out)}
    assert not infos["checkpoint-3"].complete and "checkpoint-3" in resolve_source(out).note
    assert any("empty" in p for p in infos["checkpoint-2"].problems)
    assert infos["checkpoint-1"].problems and infos["checkpoint-0"].complete
    src = resolve_source(out)
    assert src.path == out / "checkpoint-0" and "skipped checkpoint-3" in src.note
    res = run("ls", out)
    assert res.exit_code == 0 and "newest complete checkpoint: checkpoint-0" in res.output
    w = out / "checkpoint-0" / "adapter_model.safetensors"
    sd = load_file(str(w))
    k = next(iter(sd))
    sd[k] = torch.full_like(sd[k], float("nan"))
    save_file(sd, str(w))
    nan = {i.name: i for i in list_checkpoints(out, nan=True)}
    assert any("NaN" in p for p in nan["checkpoint-0"].problems)
    assert all(i.kind != "checkpoint" or not i.complete for i in nan.values())
    w.unlink()
    res = run("inspect", out)
    assert res.exit_code == 1 and res.output.count("error:") == 1 and "no complete checkpoint" in res.output


def test_llamafactory_run_dir_uses_its_final_adapter(qwen2_vl_base, tmp_path):
    model, base = qwen2_vl_base
    pm, trainer = trainer_run(model, MTS, tmp_path / "lf", steps=2)
    out = as_llamafactory(trainer, tmp_path / "lf")
    assert resolve_source(out).path == out  # the top level is itself the adapter (the final save)
    infos = list_checkpoints(out)
    assert [i.kind for i in infos][:2] == ["final", "checkpoint"] and infos[0].step == 2


def test_swift_lora_llm_vit_safetensors_is_part_of_the_adapter(qwen2_vl_base, tmp_path):
    model, base = qwen2_vl_base
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm, _ = make_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=r"^(model\.language_model(?=\.).*\.(q_proj|v_proj))$"))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if ".visual." in n:  # the lora_llm tuner trains ViT/aligner whole
                p.requires_grad_(True)
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    ck = swift_lora_llm_save(pm, tmp_path / "checkpoint-1")
    res = run("inspect", ck, "--json")
    info = json.loads(res.output)
    assert any(f["code"] == "extra-weights" for f in info["findings"]) and info["groups"]["vision"]["roles"].get("full")
    assert run("merge", ck, "--base", base, "-o", tmp_path / "m").exit_code == 0
    from transformers import AutoModelForImageTextToText

    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "m").eval()
    inputs = mm_inputs("qwen2-vl")
    assert (logits(merged, inputs) - logits(pm, inputs)).abs().max() < 1e-5


# ----------------------------------------------------------------------------------------------------------
# hub ids


def test_hub_ids_resolve_from_the_local_cache(swift_run, qwen2_vl_base, tmp_path):
    _, base = qwen2_vl_base
    cache = tmp_path / "hub"
    add_to_cache(cache, "tiny-org/qwen2-vl-base", base)
    adapter = tmp_path / "adapter"
    shutil.copytree(swift_run["out"] / "checkpoint-3", adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "tiny-org/qwen2-vl-base"}))
    add_to_cache(cache, "tiny-org/qwen2-vl-lora", adapter, revision="v1")
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    import huggingface_hub.constants as c

    old = c.HF_HUB_CACHE
    c.HF_HUB_CACHE = str(cache)  # huggingface_hub reads its cache dir once, at import
    try:
        src = resolve_source("tiny-org/qwen2-vl-lora@v1")
        assert src.repo_id == "tiny-org/qwen2-vl-lora" and (src.path / "adapter_config.json").is_file()
        with pytest.raises(CheckpointError, match="--download"):
            resolve_source("tiny-org/qwen2-vl-lora")  # only @v1 is cached; no download without --download
        res = run("inspect", "tiny-org/qwen2-vl-base", env=env)
        assert res.exit_code == 0 and "Hugging Face cache snapshot" in res.output
        res = run("merge", "tiny-org/qwen2-vl-lora@v1", "-o", tmp_path / "m", env=env)  # no --base
        assert res.exit_code == 0, res.output
        assert "using the adapter's base_model_name_or_path tiny-org/qwen2-vl-base" in res.output
        assert (_merged_logits(tmp_path / "m") - logits(swift_run["pm"])).abs().max() < 1e-5
        assert run("diff", "tiny-org/qwen2-vl-base", base, env=env).exit_code == 0
        res = run("audit", "tiny-org/qwen2-vl-lora@v1", "--base", "tiny-org/qwen2-vl-base", env=env)
        assert res.exit_code == 0, res.output
        res = run("inspect", "nobody/nothing", env=env)
        assert res.exit_code == 1 and "not in the local Hugging Face cache" in res.output
    finally:
        c.HF_HUB_CACHE = old
