"""Session fixtures for the hardening tests (helpers live in hardening_util.py / fuzzlib.py)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hardening_util import build_qwen2_vl, make_lora_adapter  # noqa: E402


def _pair(root: Path, *, vocab: int, max_shard_size: str) -> tuple[Path, Path]:
    """A sharded Qwen2-VL base made from config and a LoRA + lm_head adapter for it, under ``root``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_qwen2_vl(root / "base", vocab=vocab, max_shard_size=max_shard_size)
        make_lora_adapter(model, root / "adapter")
    return root / "base", root / "adapter"


@pytest.fixture(scope="session")
def big_pair(tmp_path_factory):
    """A ~100 MB sharded base (200k-row untied embedding/head) and its adapter (~50 MB).

    Big enough that a merge takes a noticeable moment (time to kill it mid-write), small enough to build in
    a few seconds.
    """
    return _pair(tmp_path_factory.mktemp("big"), vocab=200_000, max_shard_size="20MB")


@pytest.fixture(scope="session")
def small_pair(tmp_path_factory):
    """A tiny sharded base and adapter for fast in-process fault injection."""
    return _pair(tmp_path_factory.mktemp("small"), vocab=512, max_shard_size="100KB")
