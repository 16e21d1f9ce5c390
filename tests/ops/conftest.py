"""Ops fixtures: an app with auth on over a real store, tokens of every scope, the live service."""
from __future__ import annotations

import dataclasses

import pytest

from tests.api.conftest import BACKENDS, POSTGRES_URL, _postgres_schema, redis_server  # noqa: F401 (a fixture)
from tests.conftest import running_app


@pytest.fixture(params=BACKENDS)
def auth_settings(request, settings):
    """Auth on, store migrated (SQLite, and PostgreSQL when CI provides one); no Redis needed."""
    from worker.db import migrate

    drop = None
    s = dataclasses.replace(settings, auth_enabled=True)
    if request.param == "postgres":
        url, drop = _postgres_schema(POSTGRES_URL)
        s = dataclasses.replace(s, database_url=url)
    migrate(s)
    yield s
    if drop:
        from worker.db import make_engine

        make_engine(s).dispose()
        drop()


@pytest.fixture
def tokens(auth_settings):
    from worker.tokens import TokenStore

    return TokenStore.from_settings(auth_settings)


@pytest.fixture
def auth_app(auth_settings):
    with running_app(auth_settings) as app:
        yield app


@pytest.fixture
def auth_client(auth_app):
    return auth_app.test_client()


@pytest.fixture
def scoped(tokens):
    """{scope: token} for read, submit, predict and admin, plus 'revoked' (a revoked admin token)."""
    out = {scope: tokens.create(f"t-{scope}", [scope])[0] for scope in ("read", "submit", "predict", "admin")}
    out["revoked"] = tokens.create("t-revoked", ["admin"])[0]
    tokens.revoke("t-revoked")
    return out


@pytest.fixture(scope="session")
def live_service(tmp_path_factory):
    """worker.live's LiveService (real Redis, Celery worker, gunicorn), with auth on.

    Shared by the ops modules (CLI, metrics, browser). PROMETHEUS_MULTIPROC_DIR is set
    for its processes, as deploy/gunicorn.conf.py does, so /metrics sums gunicorn workers.
    """
    from worker.live import LiveService

    home = tmp_path_factory.mktemp("live-ops") / "var"
    service = LiveService(home)
    service.settings = dataclasses.replace(service.settings, auth_enabled=True)
    (home / "prometheus").mkdir(parents=True)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("PROMETHEUS_MULTIPROC_DIR", str(home / "prometheus"))  # env() copies os.environ
            service.start()
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="session")
def live_token(live_service):
    """An admin token for the live service (its store is a SQLite file this process can open)."""
    from worker.tokens import TokenStore

    return TokenStore.from_settings(live_service.settings).create("ops-admin", ["admin"])[0]
