"""Qwen-VL finetune.py adapters: modules_to_save declared, weights not saved (only 'lora_' keys kept)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from peft import LoraConfig

from qvl_plugin import merge
from qvl_plugin.ckpt.audit import audit
from tests.factories import ADAPTER_VARIANTS, build_model, make_adapter, rewrite_adapter, save_qwen_vl_base

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-c", "from qvl_plugin.cli import main; main()"]


@pytest.fixture(scope="module")
def v1(tmp_path_factory):
    root = tmp_path_factory.mktemp("declared")
    model = build_model("qwen-vl")
    base = save_qwen_vl_base(model, root / "base")
    _, full = make_adapter(model, ADAPTER_VARIANTS["linear-embed-head"]("qwen-vl"), root / "full")
    # what safe_save_model_for_hf_trainer writes: only keys containing "lora_"
    lora_only = rewrite_adapter(full, root / "finetune-py", lambda sd: {k: v for k, v in sd.items() if "lora_" in k})
    # modules_to_save naming a module the model does not have: PEFT ignores it, nothing is lost
    _, ghost = make_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], modules_to_save=["no_such_module"]),
                            root / "ghost")
    return base, full, lora_only, ghost


def _run(*args):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})


def test_audit_reports_missing_modules(v1):
    base, full, lora_only, ghost = v1
    for with_base in (False, True):
        found = [f for f in audit(lora_only, base=base if with_base else None) if f.code == "missing-modules-to-save"]
        assert len(found) == 1 and found[0].severity == "error", found
        assert "wte" in found[0].message and "lm_head" in found[0].message and "recover" in found[0].message
        assert not [f for f in audit(full, base=base if with_base else None) if f.code == "missing-modules-to-save"]
        assert not [f for f in audit(ghost, base=base if with_base else None) if f.code == "missing-modules-to-save"]


def test_cli_audit_merge_convert_refuse(v1, tmp_path):
    base, _, lora_only, ghost = v1
    r = _run("audit", lora_only, "--base", base, "--json")
    assert r.returncode == 1 and "missing-modules-to-save" in r.stdout
    for args in (["merge", lora_only, "--base", base, "-o", tmp_path / "m"],
                 ["convert", lora_only, "--to", "pth", "--base", base, "-o", tmp_path / "d.pth"],
                 ["convert", lora_only, "--to", "pth", "-o", tmp_path / "d2.pth"]):
        r = _run(*args)
        assert r.returncode == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr, r.stderr
        for word in ("wte", "lm_head", ".pth", "recover", "global_step", "QvlSaveCallback"):
            assert word in r.stderr, (word, r.stderr)
        assert not any(tmp_path.iterdir()), list(tmp_path.iterdir())
    merge(ghost, base, tmp_path / "ghost-merged")  # a name PEFT ignores is not an error
    assert (tmp_path / "ghost-merged" / "config.json").is_file()
