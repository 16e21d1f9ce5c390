"""A store or broker that is down: 503 with Retry-After naming the dependency, within seconds,
and no hostname, DSN, password or socket path in what an unauthenticated caller reads."""
from __future__ import annotations

import dataclasses
import socket
import threading
import time

import pytest

from tests.conftest import running_app
from worker.db import CONNECT_TIMEOUT_S


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def assert_503(resp, dependency: str, *secrets: str):
    assert resp.status_code == 503, resp.get_data(as_text=True)
    assert int(resp.headers["Retry-After"]) > 0
    err = resp.get_json()["error"]
    assert err["code"] == f"{dependency}_unavailable" and err["details"] == {"dependency": dependency}
    text = resp.get_data(as_text=True)
    for secret in secrets:
        assert secret not in text, secret
    return err


@pytest.fixture
def sqlite_down(settings, tmp_path):
    """A store whose SQLite file cannot be opened (its path is a directory)."""
    (tmp_path / "db-is-a-dir").mkdir()
    return dataclasses.replace(settings, database_url=f"sqlite:///{tmp_path}/db-is-a-dir")


@pytest.mark.parametrize("auth", [True, False])
def test_sqlite_store_down_is_503_naming_the_store(sqlite_down, auth):
    with running_app(dataclasses.replace(sqlite_down, auth_enabled=auth)) as app:
        client = app.test_client()
        headers = bearer("kiln_" + "a" * 32 + "_" + "b" * 43) if auth else {}  # the token check reads the store
        for url in ("/v1/jobs", "/v1/datasets", "/v1/jobs/" + "0" * 32):
            err = assert_503(client.get(url, headers=headers), "store", "db-is-a-dir", str(sqlite_down.home))
            assert "job store" in err["message"]
        assert client.get("/health").status_code == 200


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_postgres_refusing_connections_is_503_at_once(settings):
    url = f"postgresql+psycopg://kiln:s3cret-pw@127.0.0.1:{_closed_port()}/kiln"
    with running_app(dataclasses.replace(settings, database_url=url, auth_enabled=True)) as app:
        started = time.monotonic()
        resp = app.test_client().get("/v1/jobs", headers=bearer("kiln_" + "a" * 32 + "_" + "b" * 43))
        assert_503(resp, "store", "s3cret-pw", "127.0.0.1", "kiln:")
        assert time.monotonic() - started < CONNECT_TIMEOUT_S + 2


def test_postgres_that_never_answers_is_503_within_the_connect_timeout(settings):
    """A server that accepts TCP and then says nothing (a dead host behind a load balancer): libpq
    would wait for the OS's timeout (minutes) without connect_timeout."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)  # the kernel completes handshakes; nobody ever reads or writes
    port = listener.getsockname()[1]
    url = f"postgresql+psycopg://kiln:pw@127.0.0.1:{port}/kiln"
    try:
        with running_app(dataclasses.replace(settings, database_url=url, auth_enabled=False)) as app:
            started = time.monotonic()
            resp = app.test_client().get("/v1/jobs")
            elapsed = time.monotonic() - started
            assert_503(resp, "store", str(port))
            assert elapsed < 2 * CONNECT_TIMEOUT_S + 3, elapsed  # pre-ping and connect, each bounded
    finally:
        listener.close()


def test_ready_names_what_is_down_without_its_text(auth_settings, tmp_path, tokens):
    sock = tmp_path / "secret-place" / "no-redis.sock"
    settings = dataclasses.replace(auth_settings, redis_url=f"unix://{sock}")
    admin = tokens.create("ready-admin", ["admin"])[0]
    reader = tokens.create("ready-reader", ["read"])[0]
    with running_app(settings) as app:
        client = app.test_client()
        for headers in ({}, bearer(reader), bearer("kiln_junk")):
            resp = client.get("/ready", headers=headers)
            assert resp.status_code == 503 and int(resp.headers["Retry-After"]) > 0
            err = resp.get_json()["error"]
            assert "broker" in err["message"] and err["details"]["store"] == {"ok": True}
            assert err["details"]["broker"]["ok"] is False
            assert "secret-place" not in resp.get_data(as_text=True)
        full = client.get("/ready", headers=bearer(admin)).get_json()["error"]
        assert "secret-place" in full["details"]["broker"]["error"]  # an admin may read why


def test_health_answers_while_the_store_hangs(settings):
    """Liveness calls nothing: a store that hangs does not make /health wait."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    url = f"postgresql+psycopg://kiln:pw@127.0.0.1:{listener.getsockname()[1]}/kiln"
    try:
        with running_app(dataclasses.replace(settings, database_url=url, auth_enabled=False)) as app:
            slow = threading.Thread(target=lambda: app.test_client().get("/v1/jobs"))
            slow.start()
            started = time.monotonic()
            assert app.test_client().get("/health").status_code == 200
            assert time.monotonic() - started < 1
            slow.join(30)
    finally:
        listener.close()
