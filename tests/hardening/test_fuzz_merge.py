"""Property: merging a damaged or odd adapter onto a real base ends in a complete OUT or a QvlError with
no OUT and no temporary directory left -- never another exception, never a half-written model."""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from qvl_plugin.ckpt.merge import merge
from qvl_plugin.ckpt.view import open_checkpoint
from qvl_plugin.errors import QvlError

try:
    from .fuzzlib import Hang, merge_inputs, time_limit
except ImportError:  # tests/hardening is not a package
    from fuzzlib import Hang, merge_inputs, time_limit



def check_merge(build, base: Path, names: set[str]) -> str:
    with tempfile.TemporaryDirectory() as d:
        built = build(Path(d))
        out = Path(d) / "out" / "merged"
        out.parent.mkdir()
        try:
            with time_limit(20), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                merge(built.path, base, out, **built.kwargs)
        except QvlError as e:
            assert str(e).strip()
            assert os.listdir(out.parent) == [], f"left after a refused merge: {os.listdir(out.parent)}"
            return "error"
        except Hang:
            raise AssertionError(f"merge hung on a {built.note} input")
        with open_checkpoint(out) as ckpt:
            assert {e.key for e in ckpt.entries} >= names
        assert [p for p in os.listdir(out.parent) if p != "merged"] == []
        return "ok"


@pytest.fixture(scope="module")
def base_info(small_pair):
    base, _ = small_pair
    with open_checkpoint(base) as ckpt:
        entries = [(e.key, e.shape, e.dtype) for e in ckpt.entries]
    return base, entries


def test_fuzz_merge_inputs(base_info):
    base, entries = base_info
    names = {k for k, _, _ in entries}

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(merge_inputs(entries))
    def run(build):
        check_merge(build, base, names)

    run()
