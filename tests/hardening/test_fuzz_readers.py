"""Property: every mutated safetensors header, adapter config and dump ends in a clean result or a QvlError.

Never another exception type, never a hang (SIGALRM guard); ``tools/fuzz_readers.py`` runs the same
strategies for longer.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings

try:
    from .fuzzlib import Hang, adapter_config_inputs, check_reader, dump_inputs, pth_bytes_inputs, safetensors_inputs
except ImportError:  # rootdir-style imports (tests/hardening has no __init__.py)
    from fuzzlib import Hang, adapter_config_inputs, check_reader, dump_inputs, pth_bytes_inputs, safetensors_inputs

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _run(build) -> str:
    with tempfile.TemporaryDirectory() as d:
        built = build(Path(d))
        try:
            return check_reader(built.path, timeout=5.0, **built.kwargs)
        except Hang:
            raise AssertionError(f"hang on {built.note} input")


@FUZZ
@given(safetensors_inputs())
def test_fuzz_safetensors_headers(build):
    assert _run(build) in ("ok", "error")


@FUZZ
@given(adapter_config_inputs())
def test_fuzz_adapter_configs(build):
    assert _run(build) in ("ok", "error")


@FUZZ
@given(dump_inputs())
def test_fuzz_dump_dicts(build):
    assert _run(build) in ("ok", "error")


@FUZZ
@given(pth_bytes_inputs())
def test_fuzz_damaged_torch_zips(build):
    assert _run(build) in ("ok", "error")
