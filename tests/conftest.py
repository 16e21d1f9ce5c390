"""Shared fixtures: a private Settings per test; live services live in tests/integration."""
from __future__ import annotations

from contextlib import contextmanager

import pytest

from configs import Settings


@pytest.fixture
def settings(tmp_path) -> Settings:
    """Settings whose home (SQLite, storage, Redis socket) is a fresh temp dir."""
    return Settings.for_home(tmp_path / "var", auth_enabled=False)


@contextmanager
def running_app(settings: Settings, **config):
    """A Flask app built by the real factory for ``settings``; its Kiln facade is closed after."""
    from web import create_app

    app = create_app(settings)
    app.config.update(TESTING=True, **config)
    try:
        yield app
    finally:
        app.extensions["kiln"].close()
