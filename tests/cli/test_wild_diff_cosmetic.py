"""Issue 11: diff compares the config fields that change behaviour; inspect/audit wording on full models."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from qvl_plugin.ckpt.diff import diff_checkpoints
from qvl_plugin.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _edit(path, fn):
    f = path / "config.json"
    cfg = json.loads(f.read_text())
    fn(cfg)
    f.write_text(json.dumps(cfg))


EDITS = {
    "tie_word_embeddings": lambda c: c.update(tie_word_embeddings=not c.get("tie_word_embeddings", False)),
    "text_config.tie_word_embeddings": lambda c: c["text_config"].update(tie_word_embeddings=not c["text_config"].get("tie_word_embeddings", False)),
    "text_config.vocab_size": lambda c: c["text_config"].update(vocab_size=c["text_config"]["vocab_size"] + 8),
    "model_type": lambda c: c.update(model_type="qwen2_5_vl"),
    "architectures": lambda c: c.update(architectures=["Qwen2_5_VLForConditionalGeneration"]),
    "dtype": lambda c: c.update(dtype="bfloat16"),
}


@pytest.mark.parametrize("field", sorted(EDITS))
def test_equal_tensors_with_a_behaviour_changing_config_field_are_different(field, qwen2_vl_base, tmp_path):
    _, base = qwen2_vl_base
    other = tmp_path / "other"
    shutil.copytree(base, other)
    _edit(other, EDITS[field])
    report = diff_checkpoints(other, base)  # reported "equal" before issue 11
    assert report.tensors_equal and not report.equal
    assert [c.field for c in report.config] == [field]
    res = run("diff", other, base, "--json")
    assert res.exit_code == 1, res.output
    assert json.loads(res.output)["config"][0]["field"] == field and json.loads(res.output)["equal"] is False
    res = run("diff", other, base)
    assert res.exit_code == 1 and field in res.output and "config field(s) differ" in res.output
    assert run("diff", base, base).exit_code == 0


def test_inspect_merged_labels_and_audit_of_base_against_itself(qwen2_vl_base):
    _, base = qwen2_vl_base
    res = run("inspect", base, "--json")
    info = json.loads(res.output)
    assert set(info["roles"]) <= {"weight", "bias", "other"} and "base" not in info["roles"]
    assert all("base" not in g["roles"] for g in info["groups"].values())
    res = run("audit", base, "--base", base)
    assert "base base" not in res.output and "SRC is --base itself" in res.output, res.output
