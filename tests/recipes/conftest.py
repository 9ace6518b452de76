"""Fixtures for the recipe tests."""

from __future__ import annotations

import pytest
from recipe_models import build

from qvl_plugin.recipes import reset_registry


@pytest.fixture
def tiny():
    return build


@pytest.fixture(autouse=True)
def _fresh_registry(monkeypatch):
    monkeypatch.delenv("QVL_PLUGINS", raising=False)
    reset_registry()
    yield
    reset_registry()
