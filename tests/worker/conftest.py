"""Store fixtures on SQLite always, and on PostgreSQL too when KILN_TEST_POSTGRES_URL is set."""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import uuid

import pytest
import redis
import sqlalchemy as sa

from worker.app import make_celery
from worker.db import migrate, make_engine
from worker.redis_server import RedisServer
from worker.store import JobStore

POSTGRES_URL = os.environ.get("KILN_TEST_POSTGRES_URL", "")
BACKENDS = ["sqlite"] + (["postgres"] if POSTGRES_URL else [])


def _postgres_schema(url: str):
    """A fresh schema in the test database: (url whose search_path is that schema, drop callback)."""
    schema = "kiln_w_" + uuid.uuid4().hex[:12]
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))

    def drop():
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options=-csearch_path%3D{schema}", drop


@pytest.fixture(params=BACKENDS)
def db_settings(request, settings):
    """Settings whose job store is migrated to head, on each backend."""
    drop = None
    if request.param == "postgres":
        url, drop = _postgres_schema(POSTGRES_URL)
        settings = dataclasses.replace(settings, database_url=url)
    migrate(settings)
    yield settings
    make_engine(settings).dispose()
    if drop:
        drop()


@pytest.fixture
def store(db_settings) -> JobStore:
    return JobStore.from_settings(db_settings)


TINY = {"model": {"name": "small_cnn"}, "data": {"dataset": "digits", "image_size": 16, "subset": 200},
        "training": {"epochs": 2, "batch_size": 32, "device": "cpu"}}


@pytest.fixture
def broker_settings(db_settings):
    """db_settings with a real Redis of its own as the broker (reconciling on every call)."""
    directory = tempfile.mkdtemp(prefix="kr", dir="/tmp")  # unix socket paths must stay short
    server = RedisServer(directory).start()
    try:
        yield dataclasses.replace(db_settings, redis_url=server.url, reconcile_every_s=0.0)
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def celery_app(broker_settings):
    app = make_celery(broker_settings)
    yield app
    app.close()


@pytest.fixture
def client(broker_settings):
    c = redis.Redis.from_url(broker_settings.redis_client_url)
    yield c
    c.close()
