"""`recipes export --host swift`, verified in ms-swift 4.6.0 itself (its own venv, CPU).

Both exported forms run: the shell line (split as a shell would, then ms-swift's ``sft_main`` parses it
like ``swift sft``) and the YAML config (expanded by ms-swift's own ``parse_yaml_args``, as ``swift sft
config.yaml`` does). ms-swift's ``prepare_model`` is observed to record which parameters it made
trainable, which must be exactly apply_recipe's set on the same tiny model; two training steps later the
run dir must pass ``qvl-ckpt audit``.
"""

from __future__ import annotations

import json
import shlex

import pytest

from tests.external.host_envs import SWIFT, TEXT_SAMPLES, case_args, case_recipe, make_base, qvl_ckpt, run_worker, trainable_of
from tests.external.venv import skip_if_external_off

#: case (tests/external/host_envs.py CASES) -> the export form that runs
RUNS = {"lora": "yaml", "lora-embed-head": "shell", "layer0-vision1": "shell"}

WORKER = r'''
import json, sys
from swift.cli.main import parse_yaml_args
from swift.pipelines import sft_main
from swift.pipelines.train.tuner import TunerMixin

job = json.load(open(sys.argv[1]))
seen = {}
_prepare = TunerMixin.prepare_model.__func__

def prepare_model(cls, *args, **kwargs):  # ms-swift's own tuner setup; we only look at what it made trainable
    model = _prepare(cls, *args, **kwargs)
    seen["trainable"] = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    seen["class"] = type(model).__name__
    return model

TunerMixin.prepare_model = classmethod(prepare_model)
out = {}
for name, argv in job.items():
    seen.clear()
    parse_yaml_args(argv)  # `swift sft config.yaml ...`: the config file's keys become arguments
    sft_main(argv)
    out[name] = dict(seen)
json.dump(out, open(sys.argv[2], "w"))
'''


@pytest.fixture(scope="module")
def swift_run(tmp_path_factory):
    skip_if_external_off("ms-swift")
    root = tmp_path_factory.mktemp("swift")
    base = make_base(root / "base")
    data = root / "tiny.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
                            for q, a in TEXT_SAMPLES))
    job, exports = {}, {}
    for recipe, form in RUNS.items():
        out = root / (recipe + "." + form)
        proc = qvl_ckpt("recipes", "export", *case_args(recipe), "--host", "swift", "--model", str(base), "--format", form, "-o", str(out))
        assert proc.returncode == 0, proc.stderr
        exports[recipe] = out.read_text()
        head = [str(out)] if form == "yaml" else shlex.split(out.read_text())[2:]
        job[recipe] = [*head, "--model", str(base), "--model_type", "qwen2_vl", "--template", "qwen2_vl", "--dataset", str(data), "--use_hf", "true",
                       "--check_model", "false", "--output_dir", str(root / recipe), "--add_version", "false",
                       "--max_steps", "2", "--save_steps", "2", "--per_device_train_batch_size", "2", "--learning_rate", "1e-3",
                       "--logging_steps", "1", "--report_to", "none", "--torch_dtype", "float32", "--max_length", "64",
                       "--dataset_num_proc", "1", "--dataloader_num_workers", "0", "--split_dataset_ratio", "0",
                       "--eval_strategy", "no", "--seed", "0", "--gradient_checkpointing", "false"]
    result = run_worker(SWIFT, WORKER, job, root, timeout=900)
    return base, root, exports, result


@pytest.mark.parametrize("recipe", RUNS)
def test_swift_trains_exactly_what_apply_recipe_trains(swift_run, recipe):
    base, root, exports, result = swift_run
    assert "target_regex" in exports[recipe] and "lora_rank" in exports[recipe]
    got = result[recipe]
    assert got["class"].startswith("PeftModel"), result["log"][-3000:]
    assert {n.removeprefix("base_model.model.") for n in got["trainable"]} == trainable_of(case_recipe(recipe))


@pytest.mark.parametrize("recipe", RUNS)
def test_swift_checkpoint_passes_audit(swift_run, recipe):
    base, root, exports, result = swift_run
    run_dir = root / recipe
    assert (run_dir / "checkpoint-2" / "adapter_config.json").is_file(), sorted(p.name for p in run_dir.iterdir())
    proc = qvl_ckpt("audit", str(run_dir), "--base", str(base))
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("recipe", RUNS)
def test_swift_run_dir_lists_and_merges(swift_run, recipe, tmp_path):
    """The real ms-swift output dir: `ls` finds checkpoint-2 complete (and `last-checkpoint` when ms-swift
    wrote it), and `merge RUN_DIR` picks it and writes a model that audits clean."""
    base, root, _, _ = swift_run
    run_dir = root / recipe
    proc = qvl_ckpt("ls", str(run_dir), "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    listing = json.loads(proc.stdout)
    assert listing["newest_complete"] is not None and listing["newest_complete"].endswith("checkpoint-2")
    proc = qvl_ckpt("merge", str(run_dir), "--base", str(base), "-o", str(tmp_path / "merged"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "checkpoint-2" in proc.stderr  # the choice is said
    proc = qvl_ckpt("audit", str(tmp_path / "merged"), "--base", str(base))
    assert proc.returncode == 0, proc.stdout + proc.stderr
