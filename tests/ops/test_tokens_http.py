"""Tokens over HTTP (admin scope): create with scopes and an expiry, list with last use, revoke;
expired and revoked tokens are 401; the verify cache saves database reads and still lets a
revocation from another process take effect within its TTL."""
from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from worker.tokens import TokenStore


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def error(resp, status):
    assert resp.status_code == status, resp.get_data(as_text=True)
    return resp.get_json()["error"]


def test_admin_creates_lists_and_revokes(auth_client, scoped):
    admin = bearer(scoped["admin"])
    resp = auth_client.post("/v1/tokens", json={"name": "ci", "scopes": ["submit"]}, headers=admin)
    assert resp.status_code == 201, resp.get_data(as_text=True)
    made = resp.get_json()
    secret = made.pop("token")
    assert secret.startswith("kiln_") and made["scopes"] == ["submit"] and made["expires_at"] is None
    # the new token works, with submit's implied read
    assert auth_client.get("/v1/jobs", headers=bearer(secret)).status_code == 200
    listed = auth_client.get("/v1/tokens", headers=admin)
    assert listed.status_code == 200 and secret not in listed.get_data(as_text=True)
    row = next(t for t in listed.get_json()["tokens"] if t["id"] == made["id"])
    assert row["last_used_at"] is not None and row["revoked_at"] is None
    assert "hash" not in row and "token" not in row
    # revoke: at once in this process
    gone = auth_client.delete(f"/v1/tokens/{made['id']}", headers=admin)
    assert gone.status_code == 200 and gone.get_json()["revoked_at"]
    assert error(auth_client.get("/v1/jobs", headers=bearer(secret)), 401)["code"] == "unauthorized"
    assert error(auth_client.delete(f"/v1/tokens/{made['id']}", headers=admin), 404)
    assert error(auth_client.delete("/v1/tokens/not-an-id", headers=admin), 404)
    # an admin token cannot revoke itself (no lock-out by mistake); another admin token can
    me = next(t for t in listed.get_json()["tokens"] if t["name"] == "t-admin")
    assert "itself" in error(auth_client.delete(f"/v1/tokens/{me['id']}", headers=admin), 409)["message"]
    other = auth_client.post("/v1/tokens", json={"name": "admin-2", "scopes": ["admin"]}, headers=admin).get_json()
    assert auth_client.delete(f"/v1/tokens/{me['id']}", headers=bearer(other["token"])).status_code == 200


@pytest.mark.parametrize("scope", ["read", "submit", "predict"])
def test_only_admin_manages_tokens(auth_client, scoped, scope):
    headers = bearer(scoped[scope])
    assert error(auth_client.get("/v1/tokens", headers=headers), 403)["details"]["required"] == "admin"
    assert error(auth_client.post("/v1/tokens", json={"name": "x", "scopes": ["admin"]}, headers=headers), 403)
    assert error(auth_client.delete("/v1/tokens/" + "0" * 32, headers=headers), 403)
    assert error(auth_client.get("/v1/tokens"), 401)


def test_expiry_in_seconds_and_at_a_time(auth_client, scoped):
    admin = bearer(scoped["admin"])
    short = auth_client.post("/v1/tokens", json={"name": "brief", "scopes": ["read"], "expires_in_s": 1},
                             headers=admin).get_json()
    assert auth_client.get("/v1/jobs", headers=bearer(short["token"])).status_code == 200
    time.sleep(1.2)  # expiry is checked on every use, cached verdict or not
    assert "expired" in error(auth_client.get("/v1/jobs", headers=bearer(short["token"])), 401)["message"]
    when = (datetime.now(timezone.utc) + timedelta(days=2)).isoformat()
    later = auth_client.post("/v1/tokens", json={"name": "later", "scopes": ["read"], "expires_at": when},
                             headers=admin)
    assert later.status_code == 201 and later.get_json()["expires_at"].startswith(when[:16])


@pytest.mark.parametrize("body, field", [
    ({"name": "x", "scopes": []}, "scopes"),
    ({"name": "x", "scopes": ["write"]}, "scopes[0]"),
    ({"name": "x", "scopes": ["read", "read"]}, "scopes"),
    ({"name": "x", "scopes": "read"}, "scopes"),
    ({"name": "bad name", "scopes": ["read"]}, "name"),
    ({"name": "x", "scopes": ["read"], "expires_in_s": 0}, "expires_in_s"),
    ({"name": "x", "scopes": ["read"], "expires_in_s": 10**12}, "expires_in_s"),
    ({"name": "x", "scopes": ["read"], "expires_at": "tomorrow"}, "expires_at"),
    ({"name": "x", "scopes": ["read"], "expires_at": "2001-01-01T00:00:00Z"}, "expires_at"),
    ({"name": "x", "scopes": ["read"], "expires_at": "2999-01-01T00:00:00Z", "expires_in_s": 5}, "expires_at"),
    ({"name": "x", "scopes": ["read"], "extra": 1}, "extra"),
    ({"scopes": ["read"]}, "name"),
])
def test_bad_token_requests_are_422_naming_the_field(auth_client, scoped, body, field):
    err = error(auth_client.post("/v1/tokens", json=body, headers=bearer(scoped["admin"])), 422)
    assert field in [d["field"] for d in err["details"]], err


def test_token_request_shape_errors(auth_client, scoped):
    admin = bearer(scoped["admin"])
    assert error(auth_client.post("/v1/tokens", data="name=x", headers=admin,
                                  content_type="application/x-www-form-urlencoded"), 415)
    auth_client.post("/v1/tokens", json={"name": "dup", "scopes": ["read"]}, headers=admin)
    assert error(auth_client.post("/v1/tokens", json={"name": "dup", "scopes": ["read"]}, headers=admin), 409)


def test_verify_is_cached_and_revocation_elsewhere_lands_within_the_ttl(auth_app, auth_settings, scoped):
    """Requests in a burst cost one token read; a revoke from another process (another store) is
    seen once the cached verdict is older than the TTL."""
    from web import auth

    now = [1000.0]
    store = TokenStore.from_settings(auth_settings, cache_ttl_s=5.0, clock=lambda: now[0])
    auth_app.extensions["kiln.tokens"] = store
    reads = []
    listener = lambda conn, cursor, statement, *a: reads.append(statement) if "FROM tokens" in statement else None
    sa.event.listen(store.engine, "before_cursor_execute", listener)
    client = auth_app.test_client()
    try:
        for _ in range(20):
            assert client.get("/v1/jobs", headers=bearer(scoped["read"])).status_code == 200
        assert len(reads) == 1, reads
        elsewhere = TokenStore.from_settings(auth_settings)  # e.g. the CLI, or another web process
        elsewhere.revoke("t-read")
        now[0] += 4.9
        assert client.get("/v1/jobs", headers=bearer(scoped["read"])).status_code == 200  # still cached
        now[0] += 0.2
        assert client.get("/v1/jobs", headers=bearer(scoped["read"])).status_code == 401
        assert auth.token_store(auth_app) is store
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", listener)


def test_last_use_is_written_at_most_once_a_minute(tokens):
    token, row = tokens.create("busy", ["read"])
    tokens.cache_ttl_s = 0  # every verify reads the row
    writes = []
    listener = lambda conn, cursor, statement, *a: writes.append(1) if statement.startswith("UPDATE tokens") else None
    sa.event.listen(tokens.engine, "before_cursor_execute", listener)
    try:
        for _ in range(5):
            assert tokens.verify(token) is not None
    finally:
        sa.event.remove(tokens.engine, "before_cursor_execute", listener)
    assert len(writes) == 1
    assert next(t for t in tokens.list() if t["id"] == row["id"])["last_used_at"] is not None


def test_refused_guesses_are_cached_too_but_bounded(tokens, monkeypatch):
    from worker import tokens as module

    monkeypatch.setattr(module, "CACHE_SIZE", 10)
    for i in range(50):
        assert tokens.verify(f"kiln_{i:032x}_" + "x" * 43) is None
    assert len(tokens._cache) == 10


def test_cli_create_with_expiry_and_list_columns(auth_app):
    runner = auth_app.test_cli_runner()
    made = runner.invoke(args=["tokens", "create", "--name", "cron", "--scope", "read", "--expires-in", "3600"])
    assert made.exit_code == 0, made.output
    listed = runner.invoke(args=["tokens", "list"])
    assert "EXPIRES" in listed.output and "LAST USED" in listed.output and "cron" in listed.output
