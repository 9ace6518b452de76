"""qvl-train YAML validation: one-line errors, exit status 1, the shipped examples stay valid."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from qvl_plugin.errors import QvlError
from qvl_plugin.hosts.config import TrainConfigError, load_train_config

ROOT = Path(__file__).resolve().parents[2]
TINY_YAML = ROOT / "recipes" / "tiny-qwen2-vl.yaml"


@pytest.fixture(autouse=True)
def _keep_env(monkeypatch):
    # load_train_config sets HF_HUB_OFFLINE for the embedded model; keep that inside each test
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


ACCELERATE_CONFIGS = ("accelerate-deepspeed.yaml",)  # launch configs for `accelerate launch`, not qvl-train files
TRAIN_FILES = sorted(p for p in (ROOT / "recipes").glob("*.yaml") if p.name not in ACCELERATE_CONFIGS)


@pytest.mark.parametrize("path", TRAIN_FILES, ids=lambda p: p.name)
def test_shipped_yaml_files_are_valid(path):
    config = load_train_config(path)
    assert config.recipe.name
    assert config.embedded == path.name.startswith("tiny-qwen2-vl")
    if "zero3" in path.name:
        assert config.deepspeed["zero_optimization"]["stage"] == 3


@pytest.mark.parametrize("name", ACCELERATE_CONFIGS)
def test_shipped_accelerate_config_loads(name):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(ROOT / "recipes" / name))
    assert cfg.distributed_type == "DEEPSPEED" and cfg.num_processes == 2


def test_deepspeed_section_errors(tmp_path):
    base = {"recipe": "qwen2-vl/lora"}
    with pytest.raises(TrainConfigError, match="deepspeed 'nope.json': no such file"):
        load_train_config({**base, "deepspeed": "nope.json"})
    (tmp_path / "bad.json").write_text("[1]")
    with pytest.raises(TrainConfigError, match="expected a JSON object"):
        load_train_config({**base, "deepspeed": str(tmp_path / "bad.json")})
    with pytest.raises(TrainConfigError, match="stage must be 0, 1, 2 or 3"):
        load_train_config({**base, "deepspeed": {"zero_optimization": {"stage": 4}}})
    with pytest.raises(TrainConfigError, match="use the top-level deepspeed"):
        load_train_config({**base, "training_args": {"deepspeed": {}}})
    with pytest.raises(TrainConfigError, match="callbacks: 'x' must look like"):
        load_train_config({**base, "callbacks": ["x"]})
    (tmp_path / "z.json").write_text('{"zero_optimization": {"stage": 2}}')
    assert load_train_config({**base, "deepspeed": str(tmp_path / "z.json")}).deepspeed == {"zero_optimization": {"stage": 2}}


def test_one_example_per_generation():
    families = {load_train_config(p).recipe.family for p in TRAIN_FILES}
    assert families == {"qwen-vl", "qwen2-vl", "qwen2.5-vl", "qwen3-vl"}


BASE = {"recipe": "qwen2-vl/lora-embed-head"}


@pytest.mark.parametrize(
    "data, message",
    [
        ({**BASE, "trainig_args": {}}, "unknown key 'trainig_args' (did you mean 'training_args'?)"),
        ({"overrides": {"r": 4}}, "missing 'recipe'"),
        ({"recipe": "qwen2-vl/no-such-recipe"}, "no-such-recipe"),
        ({"recipe": 3}, "recipe must be a name or a mapping"),
        ({**BASE, "overrides": {"rank": 4}}, "unknown field(s) rank"),
        ({**BASE, "overrides": {"save": ["adapter", "gguf"]}}, "gguf"),
        ({**BASE, "overrides": []}, "overrides must be a mapping"),
        ({**BASE, "training_args": {"learning_rte": 1e-4}}, "unknown TrainingArguments field 'learning_rte' (did you mean 'learning_rate'?)"),
        ({**BASE, "training_args": {"output_dir": "x"}}, "use the top-level output_dir"),
        ({**BASE, "training_args": {"remove_unused_columns": True}}, "remove_unused_columns must stay False"),
        ({**BASE, "training_args": "fast"}, "training_args must be a mapping"),
        ({**BASE, "dataset": "no/such/file.jsonl"}, "no such file"),
        ({**BASE, "synthetic_size": 0}, "synthetic_size must be >= 1"),
        ({**BASE, "seed": "zero"}, "seed must be an integer"),
        ({**BASE, "model": ""}, "model is empty"),
        ({**BASE, "collator": "nocolon"}, "pkg.module:factory"),
        ({"recipe": "qwen3-vl/lora"}, "the embedded tiny model is a Qwen2-VL"),
    ],
)
def test_invalid_config_is_a_one_line_error(data, message):
    with pytest.raises(TrainConfigError) as info:
        load_train_config(data)
    text = str(info.value)
    assert message in text
    assert "\n" not in text
    assert isinstance(info.value, QvlError)


def test_file_errors(tmp_path):
    with pytest.raises(TrainConfigError, match="no such file"):
        load_train_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("recipe: [unclosed\n")
    with pytest.raises(TrainConfigError, match="not valid YAML"):
        load_train_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(TrainConfigError, match="expected a mapping"):
        load_train_config(listy)


def test_dataset_file_is_checked(tmp_path):
    from qvl_plugin.hosts.data import JsonCaptions

    (tmp_path / "a.png").write_bytes(b"")
    good = tmp_path / "d.jsonl"
    good.write_text('{"image": "a.png", "text": "a red circle"}\n')
    assert load_train_config({**BASE, "dataset": str(good)}).dataset == good
    bad = tmp_path / "e.jsonl"
    bad.write_text('{"image": "missing.png", "text": "x"}\n')
    with pytest.raises(QvlError, match="not found"):
        JsonCaptions(bad)


def test_json_dataset_reads_images(tmp_path, tiny_processor):
    from qvl_plugin.hosts.data import JsonCaptions, QwenVLCollator, draw_shape

    draw_shape("red", "circle", "large", "grey").save(tmp_path / "a.png")
    path = tmp_path / "d.json"
    path.write_text('[{"image": "a.png", "text": "A large red circle.", "prompt": "What is it?"}]')
    ds = JsonCaptions(path)
    batch = QwenVLCollator(tiny_processor)([ds[0]])
    labels = batch["labels"][0]
    answer = tiny_processor.tokenizer.decode(labels[labels != -100])
    assert answer == "A large red circle.<|im_end|>"  # only the answer is trained on


def test_cli_error_exit_1(tmp_path):
    from qvl_plugin.cli.train import main

    cfg = tmp_path / "x.yaml"
    cfg.write_text("recipe: qwen2-vl/lora-embed-head\ntraining_args: {max_stepz: 3}\n")
    res = CliRunner().invoke(main, [str(cfg)])
    assert res.exit_code == 1
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and "max_stepz" in lines[-1]
    assert "Traceback" not in res.output
