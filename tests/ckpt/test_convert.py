"""convert: a dump becomes a loadable PEFT adapter and back, bit for bit."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from qvl_plugin.ckpt.convert import convert
from qvl_plugin.errors import AdapterConfigError, UsageError
from tests.factories import ADAPTER_VARIANTS, build_model, logits, make_adapter, make_clean_dump, make_dump

TOL = 1e-6


def _peft_load(family, tied, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(build_model(family, tied=tied), path).eval()


@pytest.mark.parametrize("variant", ["linear-embed-head", "dora", "embedding-lora", "bias-all", "lora-bias"])
def test_dump_to_peft_loads_and_reproduces(variant, qwen2_vl_tied_base, tmp_path):
    model, base = qwen2_vl_tied_base
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm, _ = make_adapter(model, ADAPTER_VARIANTS[variant]("x"))
    dump = make_dump(pm, tmp_path / "lora.pth")
    report = convert(dump, "peft", tmp_path / "peft", base=base, lora_alpha=8)
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(base) and cfg["lora_alpha"] == 8 and cfg["r"] == 4
    assert report.tensors == len({k.lstrip(".") for k in torch.load(dump)})  # leading-dot duplicates folded
    loaded = _peft_load("qwen2-vl", True, tmp_path / "peft")
    assert (logits(loaded) - logits(pm)).abs().max() < TOL


def test_dump_with_config_settings_and_token_rows(qwen25_vl_base, tmp_path):
    model, base = qwen25_vl_base
    for variant in ("rslora-patterns", "tokens-dict"):
        pm, adapter = make_adapter(model, ADAPTER_VARIANTS[variant]("x"), tmp_path / f"a-{variant}")
        dump = make_dump(pm, tmp_path / f"{variant}.pth")
        if variant == "tokens-dict":
            with pytest.raises(AdapterConfigError, match="indices"):
                convert(dump, "peft", tmp_path / "nope", lora_alpha=8)
            assert not (tmp_path / "nope").exists()
        convert(dump, "peft", tmp_path / f"p-{variant}", adapter_config=adapter / "adapter_config.json")
        loaded = _peft_load("qwen2.5-vl", False, tmp_path / f"p-{variant}")
        assert (logits(loaded) - logits(pm)).abs().max() < TOL, variant


def test_dump_without_alpha_is_refused(qwen2_vl_base, tmp_path):
    pm, _ = make_adapter(qwen2_vl_base[0], ADAPTER_VARIANTS["qv"]("x"))
    with pytest.raises(AdapterConfigError, match="never guessed"):
        convert(make_dump(pm, tmp_path / "d.pth"), "peft", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["new-layout", "legacy-layout"])
def test_peft_to_clean_dump_loads_with_no_unexpected_keys(legacy, qwen2_vl_tied_base, tmp_path):
    model, base = qwen2_vl_tied_base
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm, adapter = make_adapter(model, ADAPTER_VARIANTS["linear-embed-head"]("x"), tmp_path / "a", legacy=legacy)
    report = convert(adapter, "pth", tmp_path / "clean.pth", base=base)
    assert report.load == {"unexpected": [], "missing_adapter": []}
    sd = torch.load(tmp_path / "clean.pth", weights_only=True)
    assert all(k.startswith("base_model.model.") and not k.startswith(".") for k in sd)
    assert all(".language_model." in k or "lm_head" in k for k in sd)  # the current transformers layout
    assert len({t.untyped_storage().data_ptr() for t in sd.values()}) == len(sd)  # one tensor per key
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = get_peft_model(build_model("qwen2-vl", tied=True), pm.peft_config["default"])
    result = fresh.load_state_dict(sd, strict=False)
    assert result.unexpected_keys == []
    assert (logits(fresh.eval()) - logits(pm)).abs().max() < TOL


def test_round_trips_are_bit_exact(qwen3_vl_base, tmp_path):
    model, base = qwen3_vl_base
    pm, adapter = make_adapter(model, ADAPTER_VARIANTS["tokens"]("x"), tmp_path / "a")
    # peft -> pth -> peft: same keys, same bytes, same config
    convert(adapter, "pth", tmp_path / "x.pth")
    convert(tmp_path / "x.pth", "peft", tmp_path / "back", adapter_config=adapter / "adapter_config.json")
    a = load_file(str(adapter / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "back" / "adapter_model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert json.loads((tmp_path / "back" / "adapter_config.json").read_text()) == json.loads((adapter / "adapter_config.json").read_text())
    # pth -> peft -> pth: the clean dump comes back identical
    clean = make_clean_dump(pm, tmp_path / "clean.pth")
    convert(clean, "peft", tmp_path / "p", adapter_config=adapter / "adapter_config.json")
    convert(tmp_path / "p", "pth", tmp_path / "again.pth")
    x, y = torch.load(clean), torch.load(tmp_path / "again.pth")
    assert set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)


def test_output_rules(qwen2_vl_base, tmp_path):
    pm, adapter = make_adapter(qwen2_vl_base[0], ADAPTER_VARIANTS["qv"]("x"), tmp_path / "a")
    with pytest.raises(UsageError, match=r"\.pth"):
        convert(adapter, "pth", tmp_path / "dump.safetensors")
    with pytest.raises(UsageError, match="inside the input"):
        convert(adapter, "pth", adapter / "x.pth")
    convert(adapter, "pth", tmp_path / "x.pth")
    with pytest.raises(UsageError, match="already exists"):
        convert(adapter, "pth", tmp_path / "x.pth")
    convert(adapter, "pth", tmp_path / "x.pth", force=True)
    assert [p.name for p in tmp_path.iterdir() if ".qvl-tmp-" in p.name] == []
