"""audit: each broken case made from a real PEFT run on a tiny model; clean adapters audit clean."""

from __future__ import annotations

import copy
import json
import os
import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from qvl_plugin.ckpt.audit import CODES, audit, audit_ok
from tests.factories import rewrite_adapter, ADAPTER_VARIANTS, make_adapter, make_dump, to_legacy_key

QV = ["q_proj", "v_proj"]
MTS = LoraConfig(r=4, lora_alpha=8, target_modules=QV, modules_to_save=["embed_tokens", "lm_head"])
EMBED, HEAD = "base_model.model.model.language_model.embed_tokens.weight", "base_model.model.lm_head.weight"


def codes(findings, severity=None):
    return {f.code for f in findings if severity is None or f.severity == severity}


def by_code(findings, code):
    return next(f for f in findings if f.code == code)




@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("audit")


@pytest.fixture(scope="module")
def tied(qwen2_vl_tied_base, tmp):
    """A run with modules_to_save on the tied tiny Qwen2-VL, its adapter and its seed-style dump."""
    model, base = qwen2_vl_tied_base
    peft_model, adapter = make_adapter(model, MTS, tmp / "tied-mts")
    return dict(model=model, base=base, adapter=adapter, dump=make_dump(peft_model, tmp / "dump.pth"))


@pytest.fixture(scope="module")
def qv(qwen2_vl_base, tmp):
    model, base = qwen2_vl_base
    _, adapter = make_adapter(model, ADAPTER_VARIANTS["qv"]("qwen2-vl"), tmp / "qv")
    return dict(model=model, base=base, adapter=adapter)


# ----------------------------------------------------------------------------------------------------------
# clean


@pytest.mark.parametrize("variant", sorted(ADAPTER_VARIANTS))
def test_every_adapter_variant_audits_clean_against_its_base(qwen2_vl_base, tmp, variant):
    model, base = qwen2_vl_base
    _, adapter = make_adapter(model, ADAPTER_VARIANTS[variant]("qwen2-vl"), tmp / f"v-{variant}")
    for findings in (audit(adapter, base=base), audit(adapter)):
        assert audit_ok(findings, strict=True), [f.to_dict() for f in findings]
        assert codes(findings) <= {"vllm-incompatible"}


@pytest.mark.parametrize("family, targets", [("qwen2.5-vl", QV), ("qwen3-vl", QV), ("qwen-vl", ["c_attn", "w1"])])
def test_other_families_audit_clean(request, tmp, family, targets):
    fixture = {"qwen2.5-vl": "qwen25_vl_base", "qwen3-vl": "qwen3_vl_base", "qwen-vl": "qwen_vl_base"}[family]
    model, base = request.getfixturevalue(fixture)
    _, adapter = make_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets), tmp / f"fam-{family}")
    findings = audit(adapter, base=base)
    assert findings == [], [f.to_dict() for f in findings]


def test_merged_model_audits_clean_and_a_merged_copy_of_the_base_is_a_noop(tied, tmp):
    merged = tmp / "merged"
    peft_model, _ = make_adapter(tied["model"], MTS)
    peft_model.merge_and_unload().save_pretrained(merged)
    assert audit(merged, base=tied["base"]) == []
    assert codes(audit(tied["base"], base=tied["base"])) == {"noop-adapter"}


# ----------------------------------------------------------------------------------------------------------
# broken


def test_zeroed_lora_b_is_a_noop(qv, tied, tmp):
    zero_b = lambda sd: {k: torch.zeros_like(v) if ".lora_B." in k else v for k, v in sd.items()}
    lora_only = rewrite_adapter(qv["adapter"], tmp / "zero-qv", zero_b)
    f = audit(lora_only)
    assert codes(f, "error") == {"noop-adapter"}
    assert all(".lora_B." in k for k in by_code(f, "noop-adapter").keys) and len(by_code(f, "noop-adapter").keys) == 4

    # with trained modules_to_save the adapter still does something ...
    with_mts = rewrite_adapter(tied["adapter"], tmp / "zero-mts", zero_b)
    assert "noop-adapter" not in codes(audit(with_mts, base=tied["base"]))
    # ... unless those copies equal the base; without the base that cannot be known: a warning only
    base = {e: t for e, t in load_file(str(tied["base"] / "model.safetensors")).items()}
    emb = base["model.embed_tokens.weight"]
    untouched = lambda sd: {**zero_b(sd), EMBED: emb.clone(), HEAD: emb.clone()}
    noop = rewrite_adapter(tied["adapter"], tmp / "zero-mts-base", untouched)
    assert "noop-adapter" in codes(audit(noop, base=tied["base"]))
    assert codes(audit(noop), "warning") >= {"noop-lora"} and "noop-adapter" not in codes(audit(noop))


def test_untrained_dora_and_embedding_lora_are_noops(qwen2_vl_base, tmp):
    model, base = qwen2_vl_base
    for name, cfg in (("dora", LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=QV)),
                      ("emb", LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens"]))):
        get_peft_model(copy.deepcopy(model), cfg).save_pretrained(tmp / f"init-{name}")  # PEFT's init, untrained
        assert "noop-adapter" in codes(audit(tmp / f"init-{name}", base=base)), name
    # a trained DoRA magnitude is an effect even with lora_B at zero
    _, trained = make_adapter(model, LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=QV), tmp / "dora-trained")
    half = rewrite_adapter(trained, tmp / "dora-zero-b", lambda sd: {k: torch.zeros_like(v) if ".lora_B." in k else v for k, v in sd.items()})
    assert "noop-adapter" not in codes(audit(half, base=base))


def test_empty_tensors_from_zero3(tied, tmp):
    def zero3(sd):
        sd[HEAD] = torch.empty(0)
        sd["base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.empty(0)
        return sd

    f = audit(rewrite_adapter(tied["adapter"], tmp / "zero3", zero3), base=tied["base"])
    empty = by_code(f, "empty-tensor")
    assert empty.severity == "error" and set(empty.keys) == {HEAD, "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"}
    assert "noop-adapter" not in codes(f)


def test_nan_and_inf(qv, tmp):
    def poison(sd):
        keys = sorted(k for k in sd if ".lora_B." in k)
        sd[keys[0]][0, 0] = float("nan")
        sd[keys[1]][1, 1] = float("inf")
        return sd

    f = audit(rewrite_adapter(qv["adapter"], tmp / "nan", poison))
    assert codes(f, "error") == {"nan-inf"} and len(by_code(f, "nan-inf").keys) == 2


def test_resized_vocabulary_against_the_base(qwen2_vl_base, tmp):
    model, base = qwen2_vl_base
    resized = copy.deepcopy(model)
    resized.resize_token_embeddings(260, mean_resizing=False)
    _, adapter = make_adapter(resized, LoraConfig(r=4, lora_alpha=8, target_modules=QV, modules_to_save=["embed_tokens", "lm_head"]), tmp / "resized")
    f = audit(adapter, base=base)
    rv = by_code(f, "resized-vocab")
    assert codes(f, "error") == set() and set(rv.keys) == {EMBED, HEAD} and "from 256 to 260 rows" in rv.message
    assert "SRC ships no tokenizer" in rv.message
    assert codes(audit(adapter)) == {"vllm-incompatible"}  # header-only without a base: nothing to compare with


def test_adapter_of_another_model(qwen2_vl_base, tmp):
    """A Qwen2.5-VL adapter with other widths against a Qwen2-VL base: wrong shapes and modules the base lacks."""
    from tests.factories import tiny_config
    from transformers import AutoModelForImageTextToText

    cfg = tiny_config("qwen2.5-vl")
    cfg.text_config.hidden_size = 48
    cfg.vision_config.out_hidden_size = 48
    torch.manual_seed(0)
    other = AutoModelForImageTextToText.from_config(cfg)
    _, adapter = make_adapter(other, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"]), tmp / "other")
    f = audit(adapter, base=qwen2_vl_base[1])
    assert codes(f, "error") == {"shape-mismatch", "unmatched-key"}
    assert all("language_model" in k for k in by_code(f, "shape-mismatch").keys)
    assert all(".visual.blocks." in k and "gate_proj" in k for k in by_code(f, "unmatched-key").keys)


def test_legacy_layout_is_info_and_still_matches_the_base(qv, tmp):
    legacy = rewrite_adapter(qv["adapter"], tmp / "legacy", lambda sd: {to_legacy_key(k): v for k, v in sd.items()})
    f = audit(legacy, base=qv["base"])
    assert codes(f) == {"legacy-layout"} and by_code(f, "legacy-layout").severity == "info"
    assert audit_ok(f, strict=True)


def test_unreadable_inputs_are_findings(qv, tmp):
    trunc = shutil.copytree(qv["adapter"], tmp / "trunc")
    f = trunc / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-64])
    assert [x.code for x in audit(trunc)] == ["unreadable"]

    bad_cfg = shutil.copytree(qv["adapter"], tmp / "bad-cfg")
    (bad_cfg / "adapter_config.json").write_text("{not json")
    assert codes(audit(bad_cfg)) == {"unreadable"}

    marker = tmp / "PWNED"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"w": torch.zeros(2), "x": Payload()}, tmp / "payload.pth")
    f = audit(tmp / "payload.pth")
    assert [x.code for x in f] == ["unreadable"] and "refused" in f[0].message
    assert not marker.exists()
    # an unreadable base is reported, the adapter is still audited
    f = audit(qv["adapter"], base=trunc / "adapter_model.safetensors")
    assert codes(f) == {"unreadable"} and "base" in f[0].message


def test_seed_style_dump(tied):
    f = audit(tied["dump"], base=tied["base"])
    assert codes(f, "warning") == {"duplicate-key", "strict-false-noop", "missing-scaling", "tied-weights"}
    dup = by_code(f, "duplicate-key")
    assert len(dup.keys) == 10 and all(k.startswith(".") for k in dup.keys)
    sf = by_code(f, "strict-false-noop")
    assert len(sf.keys) == 20 and "0 of 20" in sf.message  # dot keys and plain keys both tried
    assert codes(audit(tied["dump"]), "warning") >= {"strict-false-noop", "missing-scaling"}  # from the grammar alone
    assert "missing-scaling" not in codes(audit(tied["dump"], lora_alpha=8))
    assert not audit_ok(f, strict=True) and audit_ok(f)


def test_strict_false_noop_only_when_nothing_would_load(tied, tmp):
    base = load_file(str(tied["base"] / "model.safetensors"))
    # canonical in-memory names load into the (legacy-on-disk) base: from_pretrained renames them
    torch.save({"model.language_model.embed_tokens.weight": base["model.embed_tokens.weight"].clone()}, tmp / "plain.pth")
    assert "strict-false-noop" not in codes(audit(tmp / "plain.pth", base=tied["base"]))
    assert "strict-false-noop" not in codes(audit(tmp / "plain.pth"))
    torch.save({"model.language_model.embed_tokenz.weight": base["model.embed_tokens.weight"].clone()}, tmp / "typo.pth")
    assert "strict-false-noop" in codes(audit(tmp / "typo.pth", base=tied["base"]))


def test_tied_weights(tied, qwen2_vl_base, tmp):
    f = audit(tied["adapter"], base=tied["base"])
    assert codes(f) == {"tied-weights", "vllm-incompatible"}
    assert set(by_code(f, "tied-weights").keys) == {EMBED, HEAD}
    assert by_code(f, "vllm-incompatible").severity == "info"
    # untied base: nothing to warn about
    _, untied = make_adapter(qwen2_vl_base[0], MTS, tmp / "untied-mts")
    assert codes(audit(untied, base=qwen2_vl_base[1])) == {"vllm-incompatible"}
    # only one of the pair, and LoRA on the tied embedding
    one = LoraConfig(r=4, lora_alpha=8, target_modules=QV, modules_to_save=["embed_tokens"])
    _, path = make_adapter(tied["model"], one, tmp / "tied-one")
    assert "lm_head untouched" in by_code(audit(path, base=tied["base"]), "tied-weights").message
    _, path = make_adapter(tied["model"], LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens"]), tmp / "tied-emb-lora")
    assert "PEFT's merge_and_unload" in by_code(audit(path, base=tied["base"]), "tied-weights").message


def test_merged_model_whose_config_still_ties_two_different_matrices(tied, tmp):
    merged = tmp / "merged-tied-flag"
    peft_model, _ = make_adapter(tied["model"], MTS)
    peft_model.merge_and_unload().save_pretrained(merged)
    cfg = json.loads((merged / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (merged / "config.json").write_text(json.dumps(cfg))
    f = audit(merged)
    assert codes(f) == {"tied-config-mismatch"} and not audit_ok(f)  # an error: what loads depends on the loader
    assert "transformers 4.x" in f[0].message and "transformers >= 5 keeps both" in f[0].message
    import transformers
    from transformers import AutoModelForImageTextToText

    assert int(transformers.__version__.split(".")[0]) >= 5
    loaded = AutoModelForImageTextToText.from_pretrained(merged)  # the ">= 5 keeps both" half, measured here
    assert not torch.equal(loaded.lm_head.weight, loaded.get_input_embeddings().weight)


def test_findings_are_ordered_and_codes_are_stable(tied):
    f = audit(tied["dump"], base=tied["base"])
    ranks = [("error", "warning", "info").index(x.severity) for x in f]
    assert ranks == sorted(ranks)
    for x in f:
        assert CODES.get(x.code, x.severity) == x.severity
        assert x.to_dict().keys() == {"code", "severity", "message", "keys"}
