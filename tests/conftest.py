"""Session-wide tiny models and their saved base dirs (built once, a few seconds in all)."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")

from tests.factories import build_model, save_base  # noqa: E402


def _base(tmp_path_factory, family: str, tied: bool = False):
    model = build_model(family, tied=tied)
    path = save_base(model, tmp_path_factory.mktemp(f"{family}-{'tied' if tied else 'untied'}") / "base")
    return model, path


@pytest.fixture(scope="session")
def qwen2_vl_base(tmp_path_factory):
    return _base(tmp_path_factory, "qwen2-vl")


@pytest.fixture(scope="session")
def qwen2_vl_tied_base(tmp_path_factory):
    return _base(tmp_path_factory, "qwen2-vl", tied=True)


@pytest.fixture(scope="session")
def qwen25_vl_base(tmp_path_factory):
    return _base(tmp_path_factory, "qwen2.5-vl")


@pytest.fixture(scope="session")
def qwen3_vl_base(tmp_path_factory):
    return _base(tmp_path_factory, "qwen3-vl")


@pytest.fixture(scope="session")
def qwen_vl_base(tmp_path_factory):
    return _base(tmp_path_factory, "qwen-vl")
