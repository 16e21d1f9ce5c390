"""The app as a whole: factory, health/ready, error shape, /openapi.json and /docs."""
from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

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
    assert params == {"status", "kind", "parent", "limit", "offset"}


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


def _validator(spec, name):
    """A JSON Schema validator (ECMA regexes, as schemathesis uses) for one component of the spec."""
    import jsonschema_rs

    schema = {"$ref": f"#/components/schemas/{name}", "components": spec["components"]}
    return jsonschema_rs.Draft202012Validator(schema, validate_formats=True)


def test_every_authenticated_operation_documents_its_token(api_settings):
    """Bearer security on every route behind a token (401/403/503 documented there), none on the
    public ones; every operation documents 400, every one with a body 413."""
    from tests.conftest import running_app
    from web.auth import required_scope
    from web.openapi import openapi_path

    settings = dataclasses.replace(api_settings, auth_enabled=True)
    with running_app(settings) as app:
        spec = app.test_client().get("/openapi.json").get_json()
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert spec["security"] == [{"bearer": []}]
    for rule in app.url_map.iter_rules():
        if rule.endpoint.endswith("static"):
            continue
        for method in rule.methods - HIDDEN:
            op = spec["paths"][openapi_path(rule.rule)][method.lower()]
            codes = set(op["responses"])
            scope = required_scope(rule.endpoint, rule.rule, settings)
            where = f"{method} {rule.rule}"
            if scope:
                assert op["security"] == [{"bearer": []}] and op["x-kiln-scope"] == scope, where
                assert {"401", "403", "503"} <= codes, where
                assert op["responses"]["401"]["headers"]["WWW-Authenticate"]["required"], where
            else:
                assert op["security"] == [], where
            assert "400" in codes, where
            if method in ("POST", "PUT"):
                assert "413" in codes, where
            for code in ("429", "503"):
                if code in codes:
                    assert op["responses"][code]["headers"]["Retry-After"]["required"], where


def test_spec_statuses_match_the_answers(client, job):
    """A sample of real answers: each status is among those documented for its operation."""
    spec = client.get("/openapi.json").get_json()
    calls = [
        ("get", "/v1/jobs/{job_id}", f"/v1/jobs/{job['id']}", None),
        ("get", "/v1/jobs/{job_id}", "/v1/jobs/" + "f" * 32, None),
        ("post", "/v1/jobs/{job_id}/cancel", f"/v1/jobs/{job['id']}/cancel", None),
        ("post", "/v1/jobs/{job_id}/cancel", f"/v1/jobs/{job['id']}/cancel", None),  # 409 now
        ("get", "/v1/jobs/{job_id}/logs", f"/v1/jobs/{job['id']}/logs?offset=x", None),
        ("get", "/v1/jobs/{job_id}/artifacts/{name}", f"/v1/jobs/{job['id']}/artifacts/a//b", None),
        ("get", "/v1/datasets/{dataset_id}", "/v1/datasets/zz", None),
        ("post", "/v1/tokens", "/v1/tokens", {"name": "x"}),
        ("delete", "/v1/tokens/{token_id}", "/v1/tokens/" + "0" * 32, None),
        ("post", "/v1/jobs", "/v1/jobs", {"kind": "predict", "config": {"model": "m", "data": {}}}),
    ]
    for method, path, url, body in calls:
        resp = client.open(url, method=method.upper(), json=body)
        assert str(resp.status_code) in spec["paths"][path][method]["responses"], (method, url, resp.status_code)


@pytest.mark.parametrize("body, valid", [
    ({"kind": "train", "config": {}}, True),
    ({"config": {"training": {"epochs": 2}}}, True),
    ({"kind": "predict", "config": {"model": "digits@production", "data": {"dataset": "digits"}}}, True),
    ({"kind": "predict", "config": {"model": "digits@production", "data": {}}}, False),  # root needed
    ({"kind": "predict", "config": {"training": {}}}, False),   # a train config under predict
    ({"kind": "train", "config": {"model": "digits"}}, False),
    ({"kind": "sweep-ish", "config": {}}, False),
    ({"config": {}, "priority": 3}, True),
    ({"config": {}, "priority": 10}, False),
    ({"config": {}, "urgency": 3}, False),
    ({"kind": "train"}, False),
])
def test_job_schema_is_as_strict_as_validation(client, body, valid):
    """Schema-valid bodies are accepted (or refused only for a model that does not exist) and
    schema-invalid ones refused: the published JobSubmission and the validator agree."""
    spec = client.get("/openapi.json").get_json()
    assert _validator(spec, "JobSubmission").is_valid(body) is valid
    resp = client.post("/v1/jobs", json=body)
    if valid and body.get("kind") == "predict":
        assert resp.status_code == 422 and [d["field"] for d in resp.get_json()["error"]["details"]] == ["model"]
    else:
        assert (resp.status_code == 202) is valid, resp.get_data(as_text=True)


@pytest.mark.parametrize("component, body, valid", [
    ("TokenCreate", {"name": "ci", "scopes": ["read"]}, True),
    ("TokenCreate", {"name": "ci", "scopes": ["read"], "expires_in_s": 60.0}, True),
    ("TokenCreate", {"name": "ci", "scopes": ["read"], "expires_in_s": 1, "expires_at": "2999-01-01T00:00:00Z"},
     False),
    ("TokenCreate", {"name": "ci", "scopes": []}, False),
    ("TokenCreate", {"name": "ci\n", "scopes": ["read"]}, False),
    ("Alias", {"version": 3}, True),
    ("Alias", {"version": 3.0}, True),
    ("Alias", {"version": 2**63}, False),
    ("ModelRegistration", {"name": "m", "job_id": "0" * 32}, True),
    ("ModelRegistration", {"name": "m", "job_id": "0" * 31 + "\x00"}, False),
])
def test_small_body_schemas_match_their_validator(client, component, body, valid):
    from web import schemas

    spec = client.get("/openapi.json").get_json()
    assert _validator(spec, component).is_valid(body) is valid
    source = {"TokenCreate": schemas.TOKEN_CREATE, "Alias": schemas.ALIAS,
              "ModelRegistration": schemas.MODEL_REGISTRATION}[component]
    errors: list = []
    schemas.check(source, body, "", errors)
    assert (not errors) is valid, errors


def test_links_chain_creation_to_reads(client):
    spec = client.get("/openapi.json").get_json()
    ids = {op["operationId"] for item in spec["paths"].values() for op in item.values()}
    job_links = spec["paths"]["/v1/jobs"]["post"]["responses"]["202"]["links"]
    assert {"GetJob", "CancelJob", "JobLogs"} <= set(job_links)
    dataset_links = spec["paths"]["/v1/datasets"]["post"]["responses"]["201"]["links"]
    model_links = spec["paths"]["/v1/models"]["post"]["responses"]["201"]["links"]
    token_links = spec["paths"]["/v1/tokens"]["post"]["responses"]["201"]["links"]
    for links in (job_links, dataset_links, model_links, token_links):
        for link in links.values():
            assert link["operationId"] in ids and all(v.startswith("$response.body#/") for v in link["parameters"].values())
    assert dataset_links["GetDataset"]["parameters"] == {"dataset_id": "$response.body#/id"}
    assert model_links["GetModel"]["parameters"] == {"name": "$response.body#/name"}
