"""Session fixtures for the hardening tests (helpers live in hardening_util.py / fuzzlib.py)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hardening_util import build_qwen2_vl, make_lora_adapter  # noqa: E402


@pytest.fixture(scope="session")
def big_pair(tmp_path_factory):
    """A ~100 MB sharded Qwen2-VL base (200k-row untied embedding/head) and a LoRA + lm_head adapter (~50 MB).

    Big enough that a merge takes a noticeable moment (time to kill it mid-write), small enough to build in
    a few seconds.
    """
    root = tmp_path_factory.mktemp("big")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_qwen2_vl(root / "base", vocab=200_000, max_shard_size="20MB")
        make_lora_adapter(model, root / "adapter")
    return root / "base", root / "adapter"


@pytest.fixture(scope="session")
def small_pair(tmp_path_factory):
    """A tiny sharded Qwen2-VL base and adapter for fast in-process fault injection."""
    root = tmp_path_factory.mktemp("small")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_qwen2_vl(root / "base", vocab=512, max_shard_size="100KB")
        make_lora_adapter(model, root / "adapter")
    return root / "base", root / "adapter"
