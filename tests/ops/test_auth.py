"""Bearer tokens over every API endpoint: none, bad, revoked, wrong scope, right scope."""
from __future__ import annotations

import dataclasses
import re

import pytest
from flask import Blueprint

from web import auth
from web.auth import ENDPOINT_SCOPES

# For each required scope, a token scope that must NOT pass (admin passes everything).
WRONG = {"read": "predict", "submit": "read", "predict": "read", "admin": "submit"}
PLACEHOLDERS = {"job_id": "0" * 32, "dataset_id": "0" * 32, "token_id": "0" * 32, "name": "nomodel",
                "alias": "production", "path": "train.log"}


def api_routes(app) -> list[tuple[str, str, str]]:
    """(method, concrete url, endpoint) for every rule under /v1 and /predict."""
    out = []
    for rule in app.url_map.iter_rules():
        if not auth.protected(rule.rule):
            continue
        url = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", lambda m: PLACEHOLDERS.get(m[1], "x"), rule.rule)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            out.append((method, url, rule.endpoint))
    return out


def call(client, method, url, token=None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    # An empty JSON object: handlers answer 4xx for it without reaching the broker or torch.
    kwargs = {"json": {}} if method in ("POST", "PUT") else {}
    return client.open(url, method=method, headers=headers, **kwargs)


def assert_error(resp, status, code):
    assert resp.status_code == status, (resp.status_code, resp.get_data(as_text=True))
    body = resp.get_json()
    assert set(body["error"]) == {"code", "message", "details"} and body["error"]["code"] == code


def test_every_api_endpoint_has_a_scope(auth_app):
    """A new /v1 or /predict route must be listed in web/auth.py's ENDPOINT_SCOPES (else: admin only)."""
    endpoints = {endpoint for _, _, endpoint in api_routes(auth_app)}
    assert len(endpoints) >= 15, sorted(endpoints)
    missing = sorted(endpoints - set(ENDPOINT_SCOPES))
    assert not missing, f"add these endpoints to web/auth.py ENDPOINT_SCOPES: {missing}"
    stale = sorted(set(ENDPOINT_SCOPES) - {r.endpoint for r in auth_app.url_map.iter_rules()})
    assert not stale, f"ENDPOINT_SCOPES lists endpoints that no longer exist: {stale}"
    assert set(ENDPOINT_SCOPES.values()) <= {"read", "submit", "predict", "admin"}


def test_scope_table_follows_the_rules(auth_app):
    """GETs need read; POST jobs/cancel/datasets submit; /predict predict; registry writes and
    everything under /v1/tokens admin."""
    for method, url, endpoint in api_routes(auth_app):
        scope = ENDPOINT_SCOPES[endpoint]
        if url == "/predict":
            assert scope == "predict"
        elif url.startswith("/v1/tokens") or (url.startswith("/v1/models") and method != "GET"):
            assert scope == "admin", endpoint
        elif method == "GET":
            assert scope == "read", endpoint
        else:
            assert scope == "submit", endpoint


def test_each_case_on_every_endpoint(auth_app, auth_client, scoped):
    routes = api_routes(auth_app)
    for method, url, endpoint in routes:
        need = ENDPOINT_SCOPES[endpoint]
        where = f"{method} {url}"
        assert_error(call(auth_client, method, url), 401, "unauthorized")
        assert_error(call(auth_client, method, url, "kiln_" + "0" * 32 + "_" + "x" * 43), 401, "unauthorized")
        assert_error(call(auth_client, method, url, "not-even-a-token"), 401, "unauthorized")
        assert_error(call(auth_client, method, url, scoped["revoked"]), 401, "unauthorized")
        resp = call(auth_client, method, url, scoped[WRONG[need]])
        assert_error(resp, 403, "forbidden")
        assert need in resp.get_json()["error"]["message"], where
        for scope in (need, "admin"):
            resp = call(auth_client, method, url, scoped[scope])
            assert resp.status_code not in (401, 403), (where, scope, resp.get_data(as_text=True))
            assert resp.status_code < 500, (where, scope, resp.get_data(as_text=True))


def test_401_carries_a_bearer_challenge(auth_client, scoped):
    resp = auth_client.get("/v1/jobs")
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert "tokens create" in resp.get_json()["error"]["message"]  # says how to fix it
    assert "WWW-Authenticate" not in auth_client.get("/v1/jobs", headers={
        "Authorization": f"Bearer {scoped['predict']}"}).headers


def test_scheme_and_whitespace(auth_client, scoped):
    ok = auth_client.get("/v1/jobs", headers={"Authorization": f"bearer   {scoped['read']}  "})
    assert ok.status_code == 200
    basic = auth_client.get("/v1/jobs", headers={"Authorization": f"Basic {scoped['read']}"})
    assert basic.status_code == 401
    tampered = scoped["read"][:-2] + ("AA" if not scoped["read"].endswith("AA") else "BB")
    assert auth_client.get("/v1/jobs", headers={"Authorization": f"Bearer {tampered}"}).status_code == 401


def test_public_endpoints_need_no_token(auth_client):
    assert auth_client.get("/health").status_code == 200
    assert auth_client.get("/ready").status_code != 401
    assert auth_client.get("/metrics").status_code == 200
    page = auth_client.get("/")
    assert page.status_code == 200 and b"Kiln" in page.data
    assert auth_client.get("/ui/dashboard.js").status_code == 200


def test_protect_metrics(auth_settings, scoped):
    from web import create_app

    app = create_app(dataclasses.replace(auth_settings, protect_metrics=True))
    client = app.test_client()
    try:
        assert_error(client.get("/metrics"), 401, "unauthorized")
        assert client.get("/metrics", headers={"Authorization": f"Bearer {scoped['read']}"}).status_code == 200
        assert client.get("/metrics", headers={"Authorization": f"Bearer {scoped['predict']}"}).status_code == 403
    finally:
        app.extensions["kiln"].close()


def test_auth_disabled_checks_nothing(auth_settings):
    from web import create_app

    app = create_app(dataclasses.replace(auth_settings, auth_enabled=False))
    try:
        resp = app.test_client().get("/v1/jobs", headers={"Authorization": "Bearer garbage"})
        assert resp.status_code == 200
    finally:
        app.extensions["kiln"].close()


def test_an_unlisted_api_route_fails_closed(auth_settings, scoped):
    from web import create_app

    app = create_app(auth_settings)
    extra = Blueprint("extra", __name__)
    extra.add_url_rule("/v1/extra", "extra", lambda: {"ok": True})
    app.register_blueprint(extra)
    client = app.test_client()
    try:
        assert client.get("/v1/extra").status_code == 401
        assert client.get("/v1/extra", headers={"Authorization": f"Bearer {scoped['read']}"}).status_code == 403
        assert client.get("/v1/extra", headers={"Authorization": f"Bearer {scoped['admin']}"}).status_code == 200
    finally:
        app.extensions["kiln"].close()


@pytest.mark.parametrize("scopes", [["read", "submit"], ["admin"]])
def test_multi_scope_tokens(tokens, auth_client, scopes):
    token, _ = tokens.create("multi", scopes)
    headers = {"Authorization": f"Bearer {token}"}
    assert auth_client.get("/v1/jobs", headers=headers).status_code == 200
    assert auth_client.post("/v1/jobs", json={}, headers=headers).status_code == 422
    assert (auth_client.post("/predict", json={}, headers=headers).status_code == 403) is ("admin" not in scopes)


def test_a_submit_token_reads_what_it_submits_and_nothing_more(auth_app, scoped):
    """submit implies read (a submitter follows its jobs); it does not bring predict or admin."""
    client = auth_app.test_client()
    for method, url, endpoint in api_routes(auth_app):
        needed = ENDPOINT_SCOPES[endpoint]
        resp = call(client, method, url, scoped["submit"])
        if needed in ("read", "submit"):
            assert resp.status_code not in (401, 403), (method, url, resp.get_data(as_text=True))
        else:
            assert_error(resp, 403, "forbidden")
