"""Everything that cannot be merged correctly fails before a byte is written, naming the offending keys."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from qvl_plugin.ckpt.merge import MergeError, merge
from qvl_plugin.errors import AdapterConfigError, QvlError, UsageError
from tests.factories import ADAPTER_VARIANTS, logits, make_adapter, make_dump

PREFIX = "base_model.model."


def _nothing_written(tmp_path, out="out"):
    assert not (tmp_path / out).exists()
    assert [p.name for p in tmp_path.iterdir() if ".qvl-tmp-" in p.name] == []


def _edit_weights(adapter, fn):
    f = adapter / "adapter_model.safetensors"
    sd = load_file(str(f))
    fn(sd)
    save_file(sd, str(f), metadata={"format": "pt"})


def _edit_config(adapter, **changes):
    f = adapter / "adapter_config.json"
    cfg = json.loads(f.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    f.write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def mts_adapter(qwen2_vl_base, tmp_path_factory):
    model, _ = qwen2_vl_base
    pm, path = make_adapter(model, ADAPTER_VARIANTS["linear-embed-head"]("x"), tmp_path_factory.mktemp("mts") / "a")
    return pm, path


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_dump_without_alpha_is_refused(mts_adapter, qwen2_vl_base, tmp_path):
    pm, _ = mts_adapter
    dump = make_dump(pm, tmp_path / "lora.pth")
    with pytest.raises(AdapterConfigError, match="never guessed"):
        merge(dump, qwen2_vl_base[1], tmp_path / "out")
    _nothing_written(tmp_path)


def test_resized_vocab_wrong_base_and_zero3_shards_list_their_keys(mts_adapter, qwen2_vl_base, qwen_vl_base, tmp_path):
    pm, adapter = mts_adapter
    base = qwen2_vl_base[1]

    resized = _copy(adapter, tmp_path / "resized")
    # only the embedding resized (a resized pair merges: tests/ckpt/test_resized_vocab.py)
    _edit_weights(resized, lambda sd: sd.update({k: torch.cat([v, v[:8]]) for k, v in sd.items() if k.endswith("embed_tokens.weight")}))
    with pytest.raises(MergeError, match="must be resized together") as e:
        merge(resized, base, tmp_path / "out")
    assert {k for k, _ in e.value.problems} == {PREFIX + "lm_head.weight", PREFIX + "model.language_model.embed_tokens.weight"}

    zero3 = _copy(adapter, tmp_path / "zero3")
    a_key = PREFIX + "model.language_model.layers.0.self_attn.q_proj.lora_A.weight"
    _edit_weights(zero3, lambda sd: sd.update({a_key: torch.empty(0), PREFIX + "lm_head.weight": torch.empty(0)}))
    with pytest.raises(MergeError, match="ZeRO-3") as e:
        merge(zero3, base, tmp_path / "out")
    assert {a_key, PREFIX + "lm_head.weight"} <= {k for k, _ in e.value.problems}

    nan = _copy(adapter, tmp_path / "nan")
    b_key = PREFIX + "model.language_model.layers.1.mlp.down_proj.lora_B.weight"

    def poison(sd):
        sd[b_key][0, 0] = float("nan")
        sd[PREFIX + "lm_head.weight"][3, 1] = float("inf")

    _edit_weights(nan, poison)
    with pytest.raises(MergeError, match="NaN or Inf") as e:
        merge(nan, base, tmp_path / "out")
    assert {k for k, _ in e.value.problems} == {b_key, PREFIX + "lm_head.weight"}

    v1_model, v1_base = qwen_vl_base
    with pytest.raises(MergeError, match="no base tensor"):
        merge(adapter, v1_base, tmp_path / "out")
    _nothing_written(tmp_path)


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"init_lora_weights": "pissa_niter_4"}, "residual"),
        ({"init_lora_weights": "olora"}, "residual"),
        ({"layer_replication": [[0, 2], [1, 2]]}, "layer_replication"),
        ({"peft_type": "ADALORA"}, "not supported"),
    ],
)
def test_unmergeable_settings_are_refused(mts_adapter, qwen2_vl_base, tmp_path, changes, match):
    adapter = _copy(mts_adapter[1], tmp_path / "a")
    _edit_config(adapter, **changes)
    with pytest.raises(QvlError, match=match):
        merge(adapter, qwen2_vl_base[1], tmp_path / "out")
    _nothing_written(tmp_path)


def test_grouped_conv_and_missing_factor(qwen2_vl_base, tmp_path):
    model, base = qwen2_vl_base
    _, adapter = make_adapter(model, ADAPTER_VARIANTS["conv-lora"]("x"), tmp_path / "conv")
    key = PREFIX + "model.visual.patch_embed.proj.lora_A.weight"
    _edit_weights(adapter, lambda sd: sd.update({key: sd[key][:, :1].contiguous()}))
    with pytest.raises(MergeError, match="groups > 1"):
        merge(adapter, base, tmp_path / "out")
    _, qv = make_adapter(model, ADAPTER_VARIANTS["qv"]("x"), tmp_path / "qv")
    _edit_weights(qv, lambda sd: sd.pop(PREFIX + "model.language_model.layers.0.self_attn.q_proj.lora_B.weight"))
    with pytest.raises(MergeError, match="lora_B missing"):
        merge(qv, base, tmp_path / "out")
    _nothing_written(tmp_path)


def test_two_adapters_in_one_dump_are_refused(qwen2_vl_base, tmp_path):
    model, base = qwen2_vl_base
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm, _ = make_adapter(model, ADAPTER_VARIANTS["qv"]("x"))
        pm.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    dump = tmp_path / "two.pth"
    torch.save({n: p.detach().clone() for n, p in pm.named_parameters() if "lora_" in n}, dump)
    with pytest.raises(MergeError, match="several adapters"):
        merge(dump, base, tmp_path / "out", lora_alpha=8)
    _nothing_written(tmp_path)


def test_output_refusals_and_force(mts_adapter, qwen2_vl_base, tmp_path):
    pm, adapter = mts_adapter
    base = qwen2_vl_base[1]
    with pytest.raises(UsageError, match="inside the input"):
        merge(adapter, base, base / "merged")
    with pytest.raises(UsageError, match="is the input"):
        merge(adapter, base, adapter)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(UsageError, match="already exists"):
        merge(adapter, base, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").exists()
    merge(adapter, base, tmp_path / "out", force=True)
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "config.json").exists()
    assert sorted(p.name for p in base.iterdir()) == sorted(["config.json", "generation_config.json", "model.safetensors", "chat_template.jinja", "tokenizer_config.json"])


def test_peft_config_without_alpha_uses_peft_default(qwen2_vl_base, tmp_path):
    """PEFT itself loads a config without lora_alpha with its default (8); a dump never gets a default."""
    model, base = qwen2_vl_base
    pm, adapter = make_adapter(model, ADAPTER_VARIANTS["qv"]("x"), tmp_path / "a")  # alpha 8
    _edit_config(adapter, lora_alpha=None)
    merge(adapter, base, tmp_path / "out")
    from transformers import AutoModelForImageTextToText

    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "out").eval()
    assert (logits(merged) - logits(pm)).abs().max() < 1e-4
