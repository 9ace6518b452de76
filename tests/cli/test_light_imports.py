"""Header-only commands must not import torch, transformers or peft (issue: inspect at header speed).

Each command runs in a fresh interpreter and reports which heavy modules it loaded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.factories import ADAPTER_VARIANTS, make_adapter

HEAVY = ("torch", "transformers", "peft", "accelerate", "numpy")

_PROBE = """
import json, sys
from qvl_plugin.cli import main
try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    heavy = sorted({m.split('.')[0] for m in sys.modules} & set(%r))
    print('HEAVY=' + json.dumps(heavy))
""" % (HEAVY,)

_HEADER_AUDIT = """
import json, sys
from qvl_plugin.ckpt.audit_header import header_checks
from qvl_plugin.ckpt.view import open_checkpoint
with open_checkpoint(sys.argv[1]) as ckpt, open_checkpoint(sys.argv[2]) as base:
    codes = sorted({f.code for f in header_checks(ckpt, base)})
heavy = sorted({m.split('.')[0] for m in sys.modules} & set(%r))
print('HEAVY=' + json.dumps(heavy))
""" % (HEAVY,)


def _heavy(code: str, *args: str) -> list[str]:
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, cwd=root)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("HEAVY=")), None)
    assert line is not None, proc.stdout + proc.stderr
    return json.loads(line[len("HEAVY="):])


@pytest.fixture(scope="module")
def adapter(qwen2_vl_base, tmp_path_factory):
    cfg = ADAPTER_VARIANTS["linear-embed-head"]("qwen2-vl")
    return make_adapter(qwen2_vl_base.model, cfg, tmp_path_factory.mktemp("light") / "adapter")[1]


@pytest.mark.parametrize("argv", [
    ["inspect", "{base}"],
    ["inspect", "{base}/model.safetensors", "--json"],
    ["inspect", "{adapter}"],
    ["inspect", "{adapter}", "--json"],
    ["recipes", "list"],
    ["recipes", "show", "qwen2-vl/lora"],
    ["--help"],
])
def test_header_only_commands_import_no_torch(argv, qwen2_vl_base, adapter):
    args = [a.format(base=qwen2_vl_base.path, adapter=adapter) for a in argv]
    assert _heavy(_PROBE, *args) == []


def test_audit_header_checks_import_no_torch(qwen2_vl_base, adapter):
    assert _heavy(_HEADER_AUDIT, str(adapter), str(qwen2_vl_base.path)) == []


def test_the_probe_sees_torch_when_values_are_read(qwen2_vl_base, adapter):
    """The check can fail: a command that reads values does import torch."""
    assert "torch" in _heavy(_PROBE, "audit", str(adapter), "--base", str(qwen2_vl_base.path))
