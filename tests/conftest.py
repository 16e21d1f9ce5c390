"""Shared fixtures: a private Settings per test; live services live in tests/integration."""
from __future__ import annotations

import pytest

from configs import Settings


@pytest.fixture
def settings(tmp_path) -> Settings:
    """Settings whose home (SQLite, storage, Redis socket) is a fresh temp dir."""
    return Settings.for_home(tmp_path / "var", auth_enabled=False)
