"""``merge --serve vllm`` (partial merge) and ``audit --serve vllm`` (serving rules), in the project's venv.

The pair OUT/base + OUT/adapter must reproduce the trained PeftModel's logits (transformers + PEFT,
fp32) for every adapter kind, tied and untied; the leftover adapter must pass ``audit --serve vllm``
clean. Which rules fire on which adapter kind is pinned here; tests/external/test_vllm.py holds the rules
against vLLM itself.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForImageTextToText

from qvl_plugin.ckpt.audit import audit
from qvl_plugin.ckpt.partial_merge import partial_merge
from qvl_plugin.ckpt.serve_audit import evaluate
from qvl_plugin.ckpt.view import open_checkpoint
from qvl_plugin.errors import UsageError
from qvl_plugin.serving import get_rules
from tests.factories import ADAPTER_VARIANTS, affects_text_logits, logits, make_adapter, make_dump, mm_inputs

TOL = 1e-4

#: adapter variant -> the vLLM rules that fire on it (the rest of the catalogue fires none)
EXPECTED_RULES = {
    "qv": set(),
    "linear-embed-head": {"modules-to-save"},
    "rslora-patterns": {"modules-to-save"},
    "dora": {"dora"},
    "embedding-lora": {"embedding-lora"},
    "conv-lora": {"vision-lora"},
    "lora-bias": {"lora-bias"},
    "bias-all": {"bias"},
    "tokens": {"trainable-tokens"},
    "tokens-dict": {"trainable-tokens"},
    "vision-full-path": {"vision-lora"},
}


def _load(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForImageTextToText.from_pretrained(path).eval()


def _served(out):
    model = _load(out / "base")
    if (out / "adapter").is_dir():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = PeftModel.from_pretrained(model, out / "adapter").eval()
    return model


def test_rules_file_is_complete():
    rules = get_rules("vllm")
    assert rules.checked_on["versions"] == ["0.32.0"] and rules.checked_on["range"]
    assert {r.id for r in rules.rules} == {"modules-to-save", "trainable-tokens", "dora", "lora-bias", "bias",
                                          "embedding-lora", "vision-lora", "max-lora-rank"}
    for r in rules.rules:
        assert r.engine_says and r.advice and r.what
    with pytest.raises(UsageError, match="unknown serving engine"):
        get_rules("sglang")


@pytest.mark.parametrize("variant", sorted(EXPECTED_RULES))
def test_rules_that_fire_per_adapter_kind(variant, qwen2_vl_base, tmp_path):
    model, _ = qwen2_vl_base
    _, path = make_adapter(model, ADAPTER_VARIANTS[variant]("qwen2-vl"), tmp_path / "a")
    with open_checkpoint(path) as ckpt:
        assert {h.rule.id for h in evaluate(ckpt)} == EXPECTED_RULES[variant]
    codes = {f.code for f in audit(path, serve="vllm") if f.code.startswith("vllm-")}
    assert codes == {f"vllm-{r}" for r in EXPECTED_RULES[variant]}
    plain = {f.code for f in audit(path)}
    assert ("vllm-incompatible" in plain) == bool(EXPECTED_RULES[variant])


def test_rank_limit_is_a_warning_naming_the_flag(qwen2_vl_base, tmp_path):
    from peft import LoraConfig

    model, _ = qwen2_vl_base
    _, path = make_adapter(model, LoraConfig(r=24, lora_alpha=24, target_modules=["q_proj"]), tmp_path / "a")
    (f,) = [f for f in audit(path, serve="vllm") if f.code.startswith("vllm-")]
    assert f.code == "vllm-max-lora-rank" and f.severity == "warning" and "--max-lora-rank 32" in f.message
    assert not [f for f in audit(path) if f.code == "vllm-incompatible"]  # a limit, not an incompatibility


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("variant", sorted(EXPECTED_RULES))
def test_partial_merge_reproduces_the_peft_model(variant, tied, qwen2_vl_base, qwen2_vl_tied_base, tmp_path):
    model, base = qwen2_vl_tied_base if tied else qwen2_vl_base
    pm, path = make_adapter(model, ADAPTER_VARIANTS[variant]("qwen2-vl"), tmp_path / "a")
    report = partial_merge(path, base, tmp_path / "out")
    assert set(report.rules) == EXPECTED_RULES[variant]
    served = _served(tmp_path / "out")
    inputs = None if affects_text_logits(variant, "qwen2-vl") else mm_inputs("qwen2-vl")
    want = logits(pm, inputs)
    assert (logits(served, inputs) - want).abs().max().item() < TOL
    assert (logits(model, inputs) - want).abs().max().item() > 1e-3  # the adapter does something
    if report.adapter is not None:
        assert not [f for f in audit(report.adapter, serve="vllm") if f.severity != "info"]
        cfg = json.loads((report.adapter / "adapter_config.json").read_text())
        assert cfg["modules_to_save"] is None and cfg["use_dora"] is False and cfg["bias"] == "none"
        assert not EXPECTED_RULES[variant] or report.baked
    else:
        assert variant in ("dora", "lora-bias", "vision-full-path", "conv-lora")  # every LoRA pair had to be baked
    assert not [p for p in tmp_path.iterdir() if ".qvl-tmp-" in p.name]


def test_partial_merge_of_a_dump_and_refusals(qwen2_vl_base, tmp_path):
    model, base = qwen2_vl_base
    pm, _ = make_adapter(model, ADAPTER_VARIANTS["linear-embed-head"]("qwen2-vl"))
    dump = make_dump(pm, tmp_path / "lora.pth")
    report = partial_merge(dump, base, tmp_path / "out", lora_alpha=8)
    assert (logits(_served(tmp_path / "out")) - logits(pm)).abs().max().item() < TOL
    assert report.rules == ["modules-to-save"] and len(report.baked) == 2
    with pytest.raises(UsageError, match="already exists"):
        partial_merge(dump, base, tmp_path / "out", lora_alpha=8)
    partial_merge(dump, base, tmp_path / "out", lora_alpha=8, force=True)  # atomic replace
    with pytest.raises(UsageError, match="inside the input"):
        partial_merge(dump, base, base / "out", lora_alpha=8)
    assert not (base / "out").exists()


def test_cli_audit_and_merge_serve(qwen2_vl_base, tmp_path):
    from click.testing import CliRunner

    from qvl_plugin.cli import main

    model, base = qwen2_vl_base
    _, path = make_adapter(model, ADAPTER_VARIANTS["tokens"]("qwen2-vl"), tmp_path / "a")
    r = CliRunner().invoke(main, ["audit", str(path), "--serve", "vllm", "--json"])
    assert r.exit_code == 1, r.output
    assert [f["code"] for f in json.loads(r.output)["findings"] if f["code"].startswith("vllm-")] == ["vllm-trainable-tokens"]
    r = CliRunner().invoke(main, ["merge", str(path), "--base", str(base), "-o", str(tmp_path / "out"), "--serve", "vllm", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert rep["rules"] == ["trainable-tokens"] and rep["adapter"].endswith("adapter")
    r = CliRunner().invoke(main, ["audit", rep["adapter"], "--serve", "vllm"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["audit", str(path), "--serve", "sglang"])
    assert r.exit_code == 2
