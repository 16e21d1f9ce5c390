"""The app as a whole: factory, health/ready, error shape, /openapi.json and /docs."""
from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

from tests.api.conftest import error_of
from worker.service import Kiln as RealKiln

ROOT = Path(__file__).resolve().parents[2]
HIDDEN = {"HEAD", "OPTIONS"}


def test_create_app_imports_no_torch_and_connects_nothing(api_settings):
    """The factory stays cheap: no torch, no model load (a gunicorn master must stay CUDA-free)."""
    code = ("import sys, json, dataclasses; from configs import Settings; from web import create_app; "
            f"create_app(Settings.for_home({str(api_settings.home)!r}, redis_url='unix:///nonexistent.sock')); "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_factory_reads_the_environment_once_and_builds_one_facade(tmp_path, monkeypatch):
    """create_app() with no settings reads the environment at that moment only; every request then
    sees those settings (through web.context) and the one Kiln facade built from them."""
    from web import context, create_app
    from worker import service

    built = []
    monkeypatch.setattr(service, "Kiln", lambda settings: built.append(settings) or RealKiln(settings))
    monkeypatch.setenv("KILN_HOME", str(tmp_path / "var"))
    monkeypatch.setenv("KILN_AUTH_ENABLED", "0")
    monkeypatch.setenv("KILN_MAX_REQUEST_BYTES", "12345")
    app = create_app()
    monkeypatch.setenv("KILN_MAX_REQUEST_BYTES", "99")  # too late: the factory has read it already
    try:
        client = app.test_client()
        for _ in range(3):
            assert client.get("/health").status_code == 200
        err = error_of(client.post("/v1/jobs", data=b"x" * 20_000, content_type="application/json"), 413)
        assert err["code"] == "payload_too_large" and "12345" in err["message"]
        with app.app_context():
            assert context.settings().max_request_bytes == 12345 == app.config["MAX_CONTENT_LENGTH"]
            assert context.kiln().settings is context.settings()
        assert len(built) == 1 and built[0] is context.settings(app)
    finally:
        app.extensions["kiln"].close()


def test_health_and_ready(client):
    assert client.get("/health").get_json() == {"status": "ok"}
    resp = client.get("/ready")
    assert resp.status_code == 200, resp.get_data(as_text=True)
    checks = resp.get_json()["checks"]
    assert {"store", "broker", "storage"} <= set(checks) and all(c["ok"] for c in checks.values())


def test_ready_is_503_naming_the_failed_check(api_settings, tmp_path):
    from web import create_app

    app = create_app(dataclasses.replace(api_settings, redis_url=f"unix://{tmp_path}/no-redis.sock"))
    try:
        resp = app.test_client().get("/ready")
        err = error_of(resp, 503)
        assert err["details"]["broker"]["ok"] is False and "broker" in err["message"]
        assert err["details"]["store"]["ok"] is True
        assert app.test_client().get("/health").status_code == 200  # liveness calls no dependency
    finally:
        app.extensions["kiln"].close()


def test_unexpected_exception_is_500_json(app, client):
    @app.get("/boom-for-test")
    def boom():
        raise RuntimeError("kaboom")

    err = error_of(client.get("/boom-for-test"), 500)
    assert err["code"] == "internal_error" and "kaboom" not in err["message"]


def test_openapi_covers_every_route(app, client):
    spec = client.get("/openapi.json").get_json()
    assert spec["openapi"].startswith("3.1") and spec["info"]["title"]
    from web.openapi import openapi_path

    registered = {(openapi_path(r.rule), m.lower()) for r in app.url_map.iter_rules()
                  if r.endpoint != "static" and not r.endpoint.endswith(".static") for m in r.methods - HIDDEN}
    documented = {(path, method) for path, item in spec["paths"].items() for method in item}
    assert registered == documented
    for path, item in spec["paths"].items():
        for method, op in item.items():
            assert op["responses"] and op["summary"] and op["operationId"]
            declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert declared == set(re.findall(r"{(\w+)}", path)), path
    ids = [op["operationId"] for item in spec["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids))
    # every $ref resolves
    refs = re.findall(r'"#/components/schemas/(\w+)"', json.dumps(spec))
    assert refs and set(refs) <= set(spec["components"]["schemas"])


def test_openapi_job_schema_comes_from_the_config_schema(client):
    from configs import TrainConfig, json_schema

    spec = client.get("/openapi.json").get_json()
    assert spec["components"]["schemas"]["TrainConfig"] == json.loads(json.dumps(json_schema(TrainConfig)))
    post = spec["paths"]["/v1/jobs"]["post"]
    assert set(post["requestBody"]["content"]) == {"application/json", "application/yaml"}
    assert {"202", "400", "413", "415", "422"} <= set(post["responses"])
    params = {p["name"] for p in spec["paths"]["/v1/jobs"]["get"]["parameters"]}
    assert params == {"status", "kind", "limit", "offset"}


def test_docs_page_is_swagger_ui_from_the_wheel(client):
    """/docs is Swagger UI served from the swagger-ui-bundle wheel (no CDN), over a 3.0 rendition of
    the same spec (Swagger UI 4 reads 3.0 only) that lists every path."""
    resp = client.get("/docs")
    assert resp.status_code == 200 and resp.mimetype == "text/html"
    page = resp.get_data(as_text=True)
    assert "http://" not in page and "https://" not in page  # nothing from elsewhere
    assets = re.findall(r'(?:src|href)="(/[^"]+)"', page)
    assert any(a.endswith("swagger-ui-bundle.js") for a in assets) and any(a.endswith(".css") for a in assets)
    for asset in assets:
        got = client.get(asset)
        assert got.status_code == 200 and len(got.data) > 100, asset
    url = re.search(r'data-spec-url="([^"]+)"', page)[1]
    spec30 = client.get(url).get_json()
    spec = client.get("/openapi.json").get_json()
    assert spec30["openapi"].startswith("3.0.") and set(spec30["paths"]) == set(spec["paths"])
    text = json.dumps(spec30)
    assert '"const"' not in text and '"type": "null"' not in text and '"if"' not in text


def test_published_body_schemas_are_the_ones_enforced(client):
    """What /openapi.json says about a body is what the endpoint checks: the alias version's minimum
    and the registration's documented answers come from the views themselves."""
    spec = client.get("/openapi.json").get_json()
    alias = spec["components"]["schemas"]["Alias"]["properties"]["version"]
    assert alias["minimum"] == 1
    err = error_of(client.put("/v1/models/digits/aliases/production", json={"version": 0}), 422)
    assert err["details"] == [{"field": "version", "message": "must be >= 1, got 0"}]
    register = spec["paths"]["/v1/models"]["post"]["responses"]
    assert {"201", "404", "409", "422"} <= set(register)
