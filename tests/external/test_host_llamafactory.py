"""`recipes export --host llamafactory`, verified in LLaMA-Factory 0.9.5 itself (its own venv, CPU).

Our exported YAML fragment, plus the usual data/training keys, goes through LLaMA-Factory's own argument
parser and ``run_exp``; its ``load_model`` is observed to record which parameters it made trainable, which
must be exactly apply_recipe's set on the same tiny model. Two training steps later the run dir must pass
``qvl-ckpt audit``.
"""

from __future__ import annotations

import json

import pytest
import yaml

from tests.external.host_envs import CASES, LLAMAFACTORY, TEXT_SAMPLES, case_args, case_recipe, make_base, qvl_ckpt, run_worker, trainable_of
from tests.external.venv import skip_if_external_off


WORKER = r'''
import json, sys
import llamafactory.train.sft.workflow as wf
from llamafactory.train.tuner import run_exp

job = json.load(open(sys.argv[1]))
seen = {}
_load = wf.load_model

def load_model(*args, **kwargs):  # LLaMA-Factory's own loader; we only look at what it made trainable
    model = _load(*args, **kwargs)
    seen["trainable"] = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    seen["class"] = type(model).__name__
    return model

wf.load_model = load_model
out = {}
for name, args in job.items():
    seen.clear()
    run_exp(args)
    out[name] = dict(seen)
json.dump(out, open(sys.argv[2], "w"))
'''


@pytest.fixture(scope="module")
def lf_run(tmp_path_factory):
    skip_if_external_off("LLaMA-Factory")
    root = tmp_path_factory.mktemp("llamafactory")
    base = make_base(root / "base")
    data = root / "data"
    data.mkdir()
    rows = [{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]} for q, a in TEXT_SAMPLES]
    (data / "tiny.json").write_text(json.dumps(rows))
    (data / "dataset_info.json").write_text(json.dumps({"tiny": {"file_name": "tiny.json", "formatting": "sharegpt"}}))
    job, exports = {}, {}
    for recipe in CASES:
        out = root / (recipe + ".yaml")
        proc = qvl_ckpt("recipes", "export", *case_args(recipe), "--host", "llamafactory", "--model", str(base), "-o", str(out),
                        "--allow-approximate")
        assert proc.returncode == 0, proc.stderr
        exports[recipe] = (out.read_text(), proc.stderr)
        job[recipe] = {**yaml.safe_load(out.read_text()),
                       "model_name_or_path": str(base), "trust_remote_code": False, "stage": "sft", "do_train": True,
                       "dataset": "tiny", "dataset_dir": str(data), "template": "qwen2_vl", "cutoff_len": 64,
                       "overwrite_cache": True, "preprocessing_num_workers": 1, "dataloader_num_workers": 0,
                       "output_dir": str(root / recipe), "per_device_train_batch_size": 2,
                       "max_steps": 2, "save_steps": 2, "learning_rate": 1e-3, "logging_steps": 1, "report_to": "none",
                       "bf16": False, "fp16": False, "seed": 0, "plot_loss": False}
    result = run_worker(LLAMAFACTORY, WORKER, job, root, timeout=900)
    return base, root, exports, result


LORA_TARGETS = {"lora": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                "lora-embed-head": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                "layer0-vision1": "0.self_attn.q_proj,0.self_attn.v_proj,1.attn.qkv"}


@pytest.mark.parametrize("recipe", CASES)
def test_llamafactory_trains_exactly_what_apply_recipe_trains(lf_run, recipe):
    base, root, exports, result = lf_run
    config = yaml.safe_load(exports[recipe][0])
    assert config["lora_target"] == LORA_TARGETS[recipe]
    assert config["freeze_vision_tower"] is (recipe != "layer0-vision1")
    got = result[recipe]
    assert got["class"].startswith("PeftModel"), result["log"][-3000:]
    assert {n.removeprefix("base_model.model.") for n in got["trainable"]} == trainable_of(case_recipe(recipe))


@pytest.mark.parametrize("recipe", CASES)
def test_llamafactory_checkpoint_passes_audit(lf_run, recipe):
    base, root, exports, result = lf_run
    run_dir = root / recipe
    assert (run_dir / "adapter_config.json").is_file() and (run_dir / "checkpoint-2").is_dir(), sorted(p.name for p in run_dir.iterdir())
    proc = qvl_ckpt("audit", str(run_dir), "--base", str(base))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_llamafactory_export_names_its_one_difference(lf_run):
    """The tiny model is tied: LLaMA-Factory keeps tie_word_embeddings=true after training embed/lm_head."""
    _, _, exports, _ = lf_run
    assert exports["lora"][1] == exports["layer0-vision1"][1] == ""
    assert exports["lora-embed-head"][1].startswith("warning: tied: untie: LLaMA-Factory 0.9.5 keeps")


@pytest.mark.parametrize("recipe", CASES)
def test_llamafactory_run_dir_lists_and_merges(lf_run, recipe, tmp_path):
    """The real LLaMA-Factory output dir (final adapter at the top, checkpoint-N below): `ls` lists both,
    complete, and `merge RUN_DIR` uses the final adapter and writes a model that audits clean."""
    base, root, _, _ = lf_run
    run_dir = root / recipe
    proc = qvl_ckpt("ls", str(run_dir), "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    listing = json.loads(proc.stdout)
    kinds = {c["name"]: c for c in listing["checkpoints"]}
    assert kinds["checkpoint-2"]["complete"] and kinds["checkpoint-2"]["step"] == 2
    assert listing["newest_complete"] is not None
    proc = qvl_ckpt("merge", str(run_dir), "--base", str(base), "-o", str(tmp_path / "merged"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = qvl_ckpt("audit", str(tmp_path / "merged"), "--base", str(base))
    assert proc.returncode == 0, proc.stdout + proc.stderr
