"""The `tied-config-mismatch` audit wording, measured: a merged dir whose config ties embed/head while the
file holds a different lm_head loses the trained head on transformers 4.x (the floor pin, 4.52.4) and keeps it on >= 5."""

from __future__ import annotations

import json
import warnings

import torch
from peft import LoraConfig

from qvl_plugin.ckpt.audit import audit
from tests.external.old_transformers_env import PINS, venv_for
from tests.external.venv import run_in_venv, skip_if_external_off
from tests.factories import build_model, make_adapter

_LOAD = """
import sys, torch, transformers
from transformers import AutoModelForImageTextToText
m = AutoModelForImageTextToText.from_pretrained(sys.argv[1])
print(transformers.__version__, torch.equal(m.lm_head.weight, m.get_input_embeddings().weight))
"""


def test_tied_flag_with_trained_head_is_an_error_true_for_both_version_ranges(tmp_path):
    skip_if_external_off(f"transformers {PINS['floor'][0]}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm, _ = make_adapter(build_model("qwen2-vl", tied=True),
                             LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"]))
        pm.merge_and_unload().save_pretrained(tmp_path / "merged")
    f = tmp_path / "merged" / "config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "tie_word_embeddings": True}))  # what LLaMA-Factory exports keep
    [finding] = [x for x in audit(tmp_path / "merged") if x.code == "tied-config-mismatch"]
    assert finding.severity == "error"
    (tmp_path / "load.py").write_text(_LOAD)
    proc = run_in_venv(venv_for("floor"), [str(tmp_path / "load.py"), str(tmp_path / "merged")])  # the same cached venv
    assert proc.returncode == 0, proc.stderr[-2000:]
    version, tied = proc.stdout.split()[-2:]
    assert version.startswith("4.") and tied == "True"  # 4.x: lm_head re-tied to the embedding, trained head lost
    assert "transformers 4.x re-ties lm_head" in finding.message
