"""Shared fixtures for the host-trainer tests: one short run of the tiny YAML per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY_YAML = ROOT / "recipes" / "tiny-qwen2-vl.yaml"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """``run_training`` on the shipped tiny YAML with 4 steps (adapter, clean dump and merged model)."""
    from qvl_plugin.hosts.runner import load_train_config, run_training

    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    try:
        config = load_train_config(TINY_YAML, overrides={"save": ["adapter", "pth", "merged"]},
                                   training_args={"max_steps": 4, "per_device_train_batch_size": 2})
        return run_training(config, output_dir=tmp_path_factory.mktemp("tiny-run"))
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def tiny_processor():
    from qvl_plugin.hosts.tiny import load_processor

    return load_processor()
