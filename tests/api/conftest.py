"""API fixtures: the real app on a real SQLite (or PostgreSQL) store, local storage and a real Redis."""
from __future__ import annotations

import dataclasses
import io
import os
import shutil
import tempfile
import uuid
import zipfile

import pytest

from tests.conftest import running_app
from worker.redis_server import RedisServer

POSTGRES_URL = os.environ.get("KILN_TEST_POSTGRES_URL", "")
BACKENDS = ["sqlite"] + (["postgres"] if POSTGRES_URL else [])


@pytest.fixture(scope="session")
def redis_server():
    """One real redis-server for the session; jobs just stay queued (no Celery worker here)."""
    directory = tempfile.mkdtemp(prefix="kr", dir="/tmp")  # short: unix socket paths must stay under 108 chars
    server = RedisServer(directory).start()
    yield server
    server.stop()
    shutil.rmtree(directory, ignore_errors=True)


def _postgres_schema(url: str):
    """A fresh schema in the test database; (url using it as search_path, drop callback)."""
    import sqlalchemy as sa

    schema = "kiln_test_" + uuid.uuid4().hex[:12]
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in url else "?"

    def drop():
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()
    return f"{url}{sep}options=-csearch_path%3D{schema}", drop


@pytest.fixture(params=BACKENDS)
def api_settings(request, settings, redis_server):
    """Small limits so every 4xx path is cheap to reach; the store migrated to head."""
    from worker.db import dispose_all, migrate

    drop = None
    overrides = dict(redis_url=redis_server.url, max_request_bytes=4 * 1024 * 1024, page_size_max=20,
                     max_dataset_files=50, max_dataset_unpacked_bytes=512 * 1024 * 1024,
                     max_image_pixels=512 * 512)
    if request.param == "postgres":
        overrides["database_url"], drop = _postgres_schema(POSTGRES_URL)
    s = dataclasses.replace(settings, **overrides)
    migrate(s)
    yield s
    dispose_all()  # one engine per test URL: close its pooled connections (before DROP SCHEMA)
    if drop:
        drop()


@pytest.fixture
def app(api_settings):
    with running_app(dataclasses.replace(api_settings, log_poll_s=0.05, log_follow_max_s=5.0)) as app:
        yield app


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def kiln(app):
    return app.extensions["kiln"]


TRAIN = {"model": {"name": "small_cnn"}, "data": {"dataset": "digits", "image_size": 16, "subset": 64},
         "training": {"epochs": 1, "batch_size": 16}}


@pytest.fixture
def job(client) -> dict:
    """A queued train job."""
    resp = client.post("/v1/jobs", json={"kind": "train", "config": TRAIN})
    assert resp.status_code == 202, resp.get_data(as_text=True)
    return resp.get_json()


def error_of(resp, status: int) -> dict:
    """The error object of a JSON error response with this status (asserting the shape)."""
    assert resp.status_code == status, resp.get_data(as_text=True)
    assert resp.mimetype == "application/json"
    err = resp.get_json()["error"]
    assert set(err) == {"code", "message", "details"} and err["message"]
    return err


# ---------------------------------------------------------------- zips of real images

def digit_png(image) -> bytes:
    """A real 8x8 handwritten digit (a row of scikit-learn's bundled set) as PNG bytes."""
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.rint(image * 255 / 16).astype(np.uint8), "L").save(buf, "PNG")
    return buf.getvalue()


def make_zip(entries: dict[str, bytes], top: str = "") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(top + name, data)
    return buf.getvalue()


@pytest.fixture(scope="session")
def digits_entries() -> dict[str, bytes]:
    """ImageFolder entries for 3 classes of real digits: 0/, 1/, 2/ with 4, 3 and 2 images."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    target = digits.target
    wanted = {0: 4, 1: 3, 2: 2}
    entries = {}
    for i, label in enumerate(target):
        if wanted.get(int(label), 0) > 0:
            wanted[int(label)] -= 1
            entries[f"{label}/img{i}.png"] = digit_png(digits.images[i])
    return entries
