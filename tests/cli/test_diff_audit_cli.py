"""`qvl-ckpt diff` and `qvl-ckpt audit` as a CI gate sees them: exit codes, JSON contract, readable output."""

from __future__ import annotations

import copy
import json
import os
import shutil

import pytest
import torch
from click.testing import CliRunner
from peft import LoraConfig

from qvl_plugin.cli import main
from tests.factories import rewrite_adapter, make_adapter, make_dump, to_legacy_key

QV = ["q_proj", "v_proj"]
MTS = LoraConfig(r=4, lora_alpha=8, target_modules=QV, modules_to_save=["embed_tokens", "lm_head"])


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])




@pytest.fixture(scope="module")
def runs(qwen2_vl_base, qwen2_vl_tied_base, tmp_path_factory):
    """Adapters made by PEFT on the tiny Qwen2-VL (tied and untied), and the broken cases derived from them."""
    tmp = tmp_path_factory.mktemp("cli-diff-audit")
    model, base = qwen2_vl_base
    tied_model, tied_base = qwen2_vl_tied_base
    _, clean = make_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=QV), tmp / "clean")
    peft_model, mts = make_adapter(tied_model, MTS, tmp / "mts")
    dump = make_dump(peft_model, tmp / "dump.pth")
    _, other = make_adapter(tied_model, MTS, tmp / "other", seed=2)
    resized_model = copy.deepcopy(model)
    resized_model.resize_token_embeddings(264, mean_resizing=False)
    _, resized = make_adapter(resized_model, LoraConfig(r=4, lora_alpha=8, target_modules=QV, modules_to_save=["embed_tokens"]), tmp / "resized")
    merged = tmp / "merged"
    copy.deepcopy(peft_model).merge_and_unload().save_pretrained(merged)

    def nan(sd):
        k = sorted(k for k in sd if ".lora_A." in k)[0]
        sd[k][0, 0] = float("nan")
        return sd

    trunc = shutil.copytree(clean, tmp / "trunc")
    w = trunc / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:-32])
    marker = tmp / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"w": torch.zeros(2), "p": Payload()}, tmp / "payload.pth")
    return dict(
        base=base, tied_base=tied_base, clean=clean, mts=mts, dump=dump, other=other, merged=merged, resized=resized,
        zero=rewrite_adapter(clean, tmp / "zero", lambda sd: {k: torch.zeros_like(v) if ".lora_B." in k else v for k, v in sd.items()}),
        empty=rewrite_adapter(mts, tmp / "empty", lambda sd: {**sd, "base_model.model.lm_head.weight": torch.empty(0)}),
        nan=rewrite_adapter(clean, tmp / "nan", nan),
        legacy=rewrite_adapter(clean, tmp / "legacy", lambda sd: {to_legacy_key(k): v for k, v in sd.items()}),
        trunc=trunc, payload=tmp / "payload.pth", marker=marker,
    )


# ----------------------------------------------------------------------------------------------------------
# audit


@pytest.mark.parametrize(
    "case, base, code, severity, exit_code, strict_exit",
    [
        ("zero", None, "noop-adapter", "error", 1, 1),
        ("empty", "tied_base", "empty-tensor", "error", 1, 1),
        ("nan", None, "nan-inf", "error", 1, 1),
        ("resized", "base", "shape-mismatch", "error", 1, 1),
        ("trunc", None, "unreadable", "error", 1, 1),
        ("payload", None, "unreadable", "error", 1, 1),
        ("dump", "tied_base", "duplicate-key", "warning", 0, 1),
        ("dump", "tied_base", "strict-false-noop", "warning", 0, 1),
        ("dump", None, "missing-scaling", "warning", 0, 1),
        ("mts", "tied_base", "tied-weights", "warning", 0, 1),
        ("mts", None, "vllm-incompatible", "info", 0, 0),
        ("legacy", "base", "legacy-layout", "info", 0, 0),
    ],
)
def test_audit_codes_and_exit_status(runs, case, base, code, severity, exit_code, strict_exit):
    args = ["audit", runs[case], "--json"] + (["--base", runs[base]] if base else [])
    res = run(*args)
    assert res.exit_code == exit_code, res.output
    out = json.loads(res.stdout)
    assert out.keys() == {"findings", "ok"} and out["ok"] is (exit_code == 0)
    found = [f for f in out["findings"] if f["code"] == code]
    assert found and found[0]["severity"] == severity
    assert all(set(f) == {"code", "severity", "message", "keys"} for f in out["findings"])
    assert run(*args, "--strict").exit_code == strict_exit
    assert not runs["marker"].exists()  # the pickle payload never ran


def test_clean_adapter_audits_clean(runs):
    res = run("audit", runs["clean"], "--base", runs["base"], "--strict", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout) == {"findings": [], "ok": True}
    res = run("audit", runs["clean"])
    assert res.exit_code == 0 and "ok" in res.stdout


def test_audit_human_output_and_usage_errors(runs):
    res = run("audit", runs["dump"], "--base", runs["tied_base"])
    assert res.exit_code == 0
    for code in ("duplicate-key", "strict-false-noop", "missing-scaling", "tied-weights"):
        assert code in res.stdout
    assert "ok: 0 errors, 4 warnings, 1 info" in res.stdout
    res = run("audit", runs["trunc"])
    assert res.exit_code == 1 and "unreadable" in res.stdout and "Traceback" not in res.output
    assert run("audit", runs["clean"] / "missing").exit_code == 2
    assert run("audit", runs["clean"], "--nope").exit_code == 2


# ----------------------------------------------------------------------------------------------------------
# diff


def test_diff_exit_codes(runs):
    res = run("diff", runs["dump"], runs["mts"])
    assert res.exit_code == 0, res.output
    assert "equal" in res.stdout
    res = run("diff", runs["other"], runs["mts"])
    assert res.exit_code == 1 and "different" in res.stdout
    assert run("diff", runs["clean"], runs["legacy"]).exit_code == 0
    # adapter vs merged needs --base; with it they are equal
    res = run("diff", runs["mts"], runs["merged"])
    assert res.exit_code == 2 and "--base" in res.stderr
    assert run("diff", runs["mts"], runs["merged"], "--base", runs["tied_base"], "--atol", "1e-6").exit_code == 0
    assert run("diff", runs["merged"], runs["tied_base"]).exit_code == 1
    # trouble is 2, never 1: unreadable inputs, a refused pickle, bad options
    for bad in (runs["trunc"], runs["payload"]):
        res = run("diff", bad, runs["clean"])
        assert res.exit_code == 2 and res.stderr.startswith("error: ") and len(res.stderr.strip().splitlines()) == 1
    assert run("diff", runs["clean"], runs["clean"] / "missing").exit_code == 2
    assert run("diff", runs["clean"], runs["clean"], "--atol", "-1").exit_code == 2
    assert not runs["marker"].exists()


def test_diff_json_contract_and_top(runs):
    res = run("diff", runs["other"], runs["mts"], "--json", "--top", "2")
    assert res.exit_code == 1
    out = json.loads(res.stdout)
    assert out["equal"] is False and out["mode"] == "adapter" and out["counts"]["changed"] == 6
    assert len(out["rows"]) == 2
    rels = [r["rel"] for r in out["rows"]]
    assert rels == sorted(rels, reverse=True)
    assert {"name", "kind", "status", "max_abs", "diff_norm", "rel", "keys_a", "keys_b"} <= out["rows"][0].keys()
    labels = [(g["group"], g["layer"]) for g in out["groups"]]
    assert set(labels) == {("embedding", None), ("head", None), ("language", 0), ("language", 1)}
    res = run("diff", runs["merged"], runs["tied_base"], "--top", "3")
    assert res.exit_code == 1 and "by group" in res.stdout and "largest changes (3 of 6)" in res.stdout
