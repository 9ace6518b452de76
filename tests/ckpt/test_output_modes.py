"""Outputs get the permissions a plain mkdir / file write would under the caller's umask (not mkdtemp's 0700).

Each umask runs in its own process (the umask is process-wide): merge, convert both ways, extract, and the
training-side save_outputs (adapter, pth, merged), then every created directory and file is checked.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.factories import ADAPTER_VARIANTS, build_model, make_adapter, save_base

ROOT = Path(__file__).resolve().parents[2]

_DRIVER = r"""
import os, sys, json
os.umask(int(sys.argv[1], 8))
from pathlib import Path
from qvl_plugin import merge, convert, extract
from qvl_plugin.hosts import save_outputs
base, adapter, work = map(Path, sys.argv[2:5])
merge(adapter, base, work / "merged")
convert(adapter, "pth", work / "dump.pth", base=base)
convert(work / "dump.pth", "peft", work / "peft", adapter_config=adapter / "adapter_config.json")
extract(work / "merged", base, work / "extracted", rank=4)
import torch
from peft import PeftModel
from tests.factories import build_model
model = PeftModel.from_pretrained(build_model("qwen2-vl"), str(adapter), is_trainable=True)
save_outputs(model, work / "saved", ["adapter", "pth", "merged"], base_path=base)
"""


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("modes")
    model = build_model("qwen2-vl")
    base = save_base(model, root / "base")
    _, adapter = make_adapter(model, ADAPTER_VARIANTS["linear-embed-head"]("qwen2-vl"), root / "adapter")
    return base, adapter


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_outputs_follow_the_umask(pair, umask, tmp_path):
    base, adapter = pair
    work = tmp_path / "work"
    work.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run([sys.executable, "-c", _DRIVER, f"{umask:o}", str(base), str(adapter), str(work)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    want_dir, want_file = 0o777 & ~umask, 0o666 & ~umask
    wrong = []
    seen = 0
    for p in sorted(work.rglob("*")):
        mode = stat.S_IMODE(p.lstat().st_mode)
        want = want_dir if p.is_dir() else want_file  # copied support files too: new files, like cp without -p
        seen += 1
        if mode != want:
            wrong.append(f"{p.relative_to(work)}: {mode:o} (want {want:o})")
    assert seen > 10 and not wrong, "\n".join(wrong)
    for name in ("merged", "dump.pth", "peft", "extracted", "saved", "saved/adapter", "saved/merged"):
        assert (work / name).exists(), json.dumps(sorted(str(p.relative_to(work)) for p in work.rglob("*")))
