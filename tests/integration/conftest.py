"""live_service: a real Redis, a migrated store, a real Celery worker and the web app under gunicorn."""
from __future__ import annotations

import dataclasses

import pytest

from configs import Settings

from worker.live import ROOT, TINY, LiveService, free_port  # noqa: F401 (tests import these from here)


@pytest.fixture(scope="module")
def live_service(tmp_path_factory):
    """One live Kiln per test module; every process is stopped at teardown."""
    service = LiveService(tmp_path_factory.mktemp("live") / "var")
    try:
        service.start()
        yield service
    finally:
        service.stop()


@pytest.fixture
def live_settings(live_service) -> Settings:
    return dataclasses.replace(live_service.settings)
