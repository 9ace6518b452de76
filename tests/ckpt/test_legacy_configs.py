"""Adapters whose adapter_config.json names modules in the pre-4.52 hub layout (LLaMA-Factory 0.9.2 on
transformers 4.49: full-path ``model.layers.N.*`` targets): convert maps every name, and a failing load check
leaves no output (issue 11)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from peft import LoraConfig, PeftModel, get_peft_model

from qvl_plugin.ckpt.convert import convert
from qvl_plugin.cli import main
from qvl_plugin.errors import AdapterConfigError
from tests.factories import build_model, logits, make_adapter, make_dump

TOL = 1e-6
_NEW = "model.language_model."
# Full paths in the in-memory layout, as LLaMA-Factory 0.9.5 writes them; legacy = the same with "model.".
TARGETS = [f"{_NEW}layers.{i}.{m}" for i in (0, 1) for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")]


def legacy_lora_config() -> LoraConfig:
    return LoraConfig(
        r=4, lora_alpha=8, target_modules=list(TARGETS),
        rank_pattern={r"model\.language_model\.layers\.1\.self_attn\.q_proj": 8},
        alpha_pattern={r"model\.language_model\.layers\.0\.mlp\.down_proj": 32},
        modules_to_save=[f"{_NEW}embed_tokens", "lm_head"],
    )


def to_legacy_names(cfg: dict) -> dict:
    """The adapter_config.json a pre-4.52 run writes for the same adapter."""
    text = json.dumps(cfg).replace("model.language_model.", "model.").replace(r"model\\.language_model\\.", r"model\\.")
    return json.loads(text)


def legacy_adapter(model, path: Path):
    """A real PEFT save rewritten to the pre-4.52 layout: keys and every module name in the config."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm, path = make_adapter(model, legacy_lora_config(), path, legacy=True)
    f = path / "adapter_config.json"
    legacy = to_legacy_names(json.loads(f.read_text()))
    assert legacy["target_modules"][0].startswith("model.layers.") and "model.embed_tokens" in legacy["modules_to_save"]
    f.write_text(json.dumps(legacy))
    return pm, path


def _peft_from_pretrained(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(build_model("qwen2-vl"), path).eval()


def test_legacy_adapter_to_pth_maps_targets_and_loads(qwen2_vl_base, tmp_path):
    model, base = qwen2_vl_base
    pm, adapter = legacy_adapter(model, tmp_path / "legacy")
    out = tmp_path / "x.pth"
    report = convert(adapter, "pth", out, base=base)  # raised NoMatchingPeftModuleError after writing x.pth
    assert report.load == {"unexpected": [], "missing_adapter": []}
    assert all(t.startswith(_NEW) for t in report.config["target_modules"])
    assert report.config["modules_to_save"] == [f"{_NEW}embed_tokens", "lm_head"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = get_peft_model(build_model("qwen2-vl"), LoraConfig(**{k: v for k, v in report.config.items() if k != "peft_version" and k != "peft_type"}))
    result = fresh.load_state_dict(torch.load(out, weights_only=True), strict=False)
    assert result.unexpected_keys == []
    assert (logits(fresh.eval()) - logits(pm)).abs().max() < TOL


def test_failing_load_check_leaves_no_output(qwen2_vl_base, tmp_path):
    model, base = qwen2_vl_base
    _, adapter = legacy_adapter(model, tmp_path / "legacy")
    f = adapter / "adapter_config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "exclude_modules": ".*"}))  # PEFT then targets nothing
    out = tmp_path / "x.pth"
    with pytest.raises(AdapterConfigError, match="get_peft_model"):
        convert(adapter, "pth", out, base=base)
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if ".qvl-tmp" in p.name] == []
    r = CliRunner().invoke(main, ["convert", str(adapter), "--to", "pth", "-o", str(out), "--base", str(base)])
    assert r.exit_code == 1 and r.output.count("error:") == 1 and "Traceback" not in r.output and not out.exists()


def test_dump_with_legacy_config_to_peft_loads(qwen2_vl_base, tmp_path):
    model, base = qwen2_vl_base
    pm, adapter = legacy_adapter(model, tmp_path / "legacy")
    dump = make_dump(pm, tmp_path / "lora.pth")  # in-memory (new-layout) names
    out = tmp_path / "peft"
    convert(dump, "peft", out, adapter_config=adapter / "adapter_config.json")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == sorted(TARGETS)
    assert cfg["modules_to_save"] == [f"{_NEW}embed_tokens", "lm_head"]
    assert list(cfg["rank_pattern"]) == [r"model\.language_model\.layers\.1\.self_attn\.q_proj"]
    assert list(cfg["alpha_pattern"]) == [r"model\.language_model\.layers\.0\.mlp\.down_proj"]
    loaded = _peft_from_pretrained(out)
    assert (logits(loaded) - logits(pm)).abs().max() < TOL


def test_legacy_regex_targets_are_mapped_or_made_exact(qwen2_vl_base, tmp_path):
    """A regex string (ms-swift style) in the legacy layout: rewritten and verified with PEFT's own matching."""
    model, _ = qwen2_vl_base
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=r"^(model\.language_model(?=\.).*\.(q_proj|v_proj))$")
    pm, adapter = make_adapter(model, cfg, tmp_path / "a", legacy=True)
    f = adapter / "adapter_config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "target_modules": r"model\.layers\.\d+\.self_attn\.(q_proj|v_proj)"}))
    convert(make_dump(pm, tmp_path / "d.pth"), "peft", tmp_path / "p", adapter_config=f)
    assert (logits(_peft_from_pretrained(tmp_path / "p")) - logits(pm)).abs().max() < TOL


# ----------------------------------------------------------------------------------------------------------
# audit: target_modules must resolve on the model PEFT builds


def test_audit_flags_legacy_targets_that_resolve_to_nothing(qwen2_vl_base, tmp_path):
    from qvl_plugin.ckpt.audit import audit, audit_ok

    model, base = qwen2_vl_base
    _, adapter = legacy_adapter(model, tmp_path / "legacy")
    for findings in (audit(adapter, base=base), audit(adapter)):  # audited clean before issue 11
        bad = [f for f in findings if f.code == "unresolved-target"]
        assert bad and all(f.severity == "error" for f in bad) and not audit_ok(findings)
        assert any("model.language_model.layers.0.mlp.down_proj" in f.keys for f in bad)
        assert any("NoMatchingPeftModuleError" in f.message for f in bad)
    with pytest.raises(Exception, match="(?i)no modules were targeted|target"):  # the failure the finding predicts
        _peft_from_pretrained(adapter)
    _, fixed = make_adapter(model, legacy_lora_config(), tmp_path / "fixed")
    assert not [f for f in audit(fixed, base=base) if f.code in ("unresolved-target", "unused-target")]


def test_audit_warns_about_a_stray_target(qwen2_vl_base, tmp_path):
    from qvl_plugin.ckpt.audit import audit

    model, base = qwen2_vl_base
    _, adapter = make_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), tmp_path / "a")
    f = adapter / "adapter_config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "target_modules": ["q_proj", "v_proj", "qkv_porj"]}))
    [w] = [x for x in audit(adapter, base=base) if x.code == "unused-target"]
    assert w.severity == "warning" and w.keys == ("qkv_porj",)
    f.write_text(json.dumps({**json.loads(f.read_text()), "target_modules": ["qkv_porj"]}))
    [e] = [x for x in audit(adapter, base=base) if x.code == "unresolved-target"]
    assert e.severity == "error" and "match none" in e.message
