"""qvl-train on the embedded tiny Qwen2-VL: outputs, the clean dump, the adapter, the merged model, the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from click.testing import CliRunner
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
TINY_YAML = ROOT / "recipes" / "tiny-qwen2-vl.yaml"



def test_outputs_exist_and_loss_is_finite(tiny_run):
    out = tiny_run.output_dir
    assert (out / "base" / "config.json").is_file()
    assert (out / "base" / "model.safetensors").is_file()
    assert (out / "base" / "tokenizer.json").is_file()
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "adapter.pth").is_file()
    assert tiny_run.steps == 4 and len(tiny_run.losses) == 4
    assert all(math.isfinite(loss) for _, loss in tiny_run.losses)
    assert tiny_run.dump_unexpected == 0
    # the base is the untrained, still tied model (what a merge and an audit start from)
    assert json.loads((out / "base" / "config.json").read_text())["tie_word_embeddings"] is True
    # no temp / leftover dirs from the atomic writes
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def _fresh_peft(base_dir, adapter_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2VLForConditionalGeneration

    base = Qwen2VLForConditionalGeneration.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig.from_pretrained(adapter_dir)
    config.inference_mode = False  # saved adapters say True; we want the training-time parameter set
    return get_peft_model(base, config)


def test_clean_dump_loads_with_zero_unexpected_keys(tiny_run):
    dump = torch.load(tiny_run.pth, weights_only=True, mmap=True, map_location="cpu")
    assert dump and not [k for k in dump if k.startswith(".")]
    assert len({t.untyped_storage().data_ptr() for t in dump.values()}) == len(dump)  # one key per tensor
    assert all(t.numel() > 0 for t in dump.values())
    model = _fresh_peft(tiny_run.base, tiny_run.adapter)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    result = model.load_state_dict(dump, strict=False)
    assert result.unexpected_keys == []
    assert set(dump) == trainable  # every trainable tensor, nothing else
    assert not trainable & set(result.missing_keys)
    # the embedding and head were trained apart (tied base, recipe unties)
    emb = dump["base_model.model.model.language_model.embed_tokens.modules_to_save.default.weight"]
    head = dump["base_model.model.lm_head.modules_to_save.default.weight"]
    assert not torch.equal(emb, head)


def test_adapter_holds_the_same_tensors_as_the_dump(tiny_run):
    from qvl_plugin.hosts.saving import adapter_key

    dump = torch.load(tiny_run.pth, weights_only=True, map_location="cpu")
    adapter = load_file(str(tiny_run.adapter / "adapter_model.safetensors"))
    assert {adapter_key(k) for k in dump} == set(adapter)
    for k, v in dump.items():
        assert torch.equal(adapter[adapter_key(k)], v), k
    config = json.loads((tiny_run.adapter / "adapter_config.json").read_text())
    assert set(config["modules_to_save"]) >= {"lm_head"}


def test_adapter_and_dump_give_the_same_model(tiny_run, tiny_processor):
    from peft import PeftModel
    from transformers import Qwen2VLForConditionalGeneration

    from qvl_plugin.hosts.data import QwenVLCollator, SyntheticCaptions

    batch = QwenVLCollator(tiny_processor)([SyntheticCaptions(2)[i] for i in range(2)])
    batch.pop("labels")
    from_dump = _fresh_peft(tiny_run.base, tiny_run.adapter)
    from_dump.load_state_dict(torch.load(tiny_run.pth, weights_only=True, map_location="cpu"), strict=False)
    base = Qwen2VLForConditionalGeneration.from_pretrained(tiny_run.base, dtype=torch.float32)
    from_adapter = PeftModel.from_pretrained(base, str(tiny_run.adapter))
    with torch.no_grad():
        a = from_dump.eval()(**batch).logits
        b = from_adapter.eval()(**batch).logits
    assert torch.allclose(a, b, atol=1e-5)


def test_merged_model_reproduces_the_adapter(tiny_run):
    merged = tiny_run.merged
    assert merged is not None and (merged / "config.json").is_file()
    config = json.loads((merged / "config.json").read_text())
    assert not config.get("tie_word_embeddings", False)  # the trained lm_head survives a reload
    assert tiny_run.max_abs_diff is not None and tiny_run.max_abs_diff < 1e-4


def test_qvl_ckpt_inspect_and_audit_are_clean(tiny_run):
    from qvl_plugin.cli import main

    runner = CliRunner()
    for target in (tiny_run.adapter, tiny_run.pth):
        res = runner.invoke(main, ["inspect", str(target)])
        assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["audit", str(tiny_run.adapter), "--base", str(tiny_run.base)])
    assert res.exit_code == 0, res.output
    assert "0 errors" in res.output


def test_cli_trains_and_reports(tmp_path, monkeypatch):
    import yaml

    from qvl_plugin.cli.train import main

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    data = yaml.safe_load(TINY_YAML.read_text())
    data["overrides"]["save"] = ["pth"]
    data["training_args"].update(per_device_train_batch_size=1)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(data))
    res = CliRunner().invoke(main, [str(cfg), "--max-steps", "2", "--output-dir", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert "loss first" in res.output and "trained 2 steps" in res.output
    assert (tmp_path / "out" / "adapter.pth").is_file()
    assert __import__("os").environ.get("HF_HUB_OFFLINE") == "1"  # the embedded default runs offline
