"""Session-wide tiny models and their saved base dirs (built once, well under a second each)."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")

from transformers.utils import logging as _hf_logging  # noqa: E402

from tests.factories import Base, build_model, save_base  # noqa: E402

_hf_logging.disable_progress_bar()

# Known noise from PEFT 0.21.2 / transformers 5 on these tiny models (pytest.warns still sees them).
_NOISE = [
    r"ignore:.*is_gradient_checkpointing.*",
    r"ignore:.*LoRA tensor\(s\) have invalid shape.*",  # false positive for 1-D lora_B.bias
]


def pytest_configure(config):
    for line in _NOISE:
        config.addinivalue_line("filterwarnings", line)


def _base(tmp_path_factory, family: str, tied: bool = False) -> Base:
    model = build_model(family, tied=tied)
    path = save_base(model, tmp_path_factory.mktemp(f"{family}-{'tied' if tied else 'untied'}") / "base")
    return Base(model, path)


@pytest.fixture(scope="session")
def qwen2_vl_base(tmp_path_factory) -> Base:
    return _base(tmp_path_factory, "qwen2-vl")


@pytest.fixture(scope="session")
def qwen2_vl_tied_base(tmp_path_factory) -> Base:
    return _base(tmp_path_factory, "qwen2-vl", tied=True)


@pytest.fixture(scope="session")
def qwen25_vl_base(tmp_path_factory) -> Base:
    return _base(tmp_path_factory, "qwen2.5-vl")


@pytest.fixture(scope="session")
def qwen25_vl_tied_base(tmp_path_factory) -> Base:
    return _base(tmp_path_factory, "qwen2.5-vl", tied=True)


@pytest.fixture(scope="session")
def qwen3_vl_base(tmp_path_factory) -> Base:
    return _base(tmp_path_factory, "qwen3-vl")


@pytest.fixture(scope="session")
def qwen3_vl_tied_base(tmp_path_factory) -> Base:
    return _base(tmp_path_factory, "qwen3-vl", tied=True)


@pytest.fixture(scope="session")
def qwen_vl_base(tmp_path_factory) -> Base:
    return _base(tmp_path_factory, "qwen-vl")


_FIXTURE = {("qwen2-vl", False): "qwen2_vl_base", ("qwen2-vl", True): "qwen2_vl_tied_base",
            ("qwen2.5-vl", False): "qwen25_vl_base", ("qwen2.5-vl", True): "qwen25_vl_tied_base",
            ("qwen3-vl", False): "qwen3_vl_base", ("qwen3-vl", True): "qwen3_vl_tied_base",
            ("qwen-vl", False): "qwen_vl_base"}


@pytest.fixture(scope="session")
def get_base(request):
    """``get_base(family, tied=False) -> Base``: the cached session base for any family (for parametrized tests)."""
    return lambda family, tied=False: request.getfixturevalue(_FIXTURE[(family, tied)])


@pytest.fixture(scope="session")
def qwen3_vl_moe_base(tmp_path_factory) -> Base:
    return _base(tmp_path_factory, "qwen3-vl-moe")
