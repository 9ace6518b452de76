"""The public API: every name in ``qvl_plugin.__all__`` resolves, and importing stays light."""

from __future__ import annotations

import subprocess
import sys

import qvl_plugin


def test_every_public_name_resolves():
    for name in qvl_plugin.__all__:
        assert getattr(qvl_plugin, name) is not None, name


def test_import_does_not_pull_torch():
    code = "import sys, qvl_plugin; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
