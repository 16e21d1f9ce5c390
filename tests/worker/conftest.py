"""Store fixtures on SQLite always, and on PostgreSQL too when KILN_TEST_POSTGRES_URL is set."""
from __future__ import annotations

import dataclasses
import os
import uuid

import pytest
import sqlalchemy as sa

from worker.db import migrate, make_engine
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
