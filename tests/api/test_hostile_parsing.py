"""Hostile bodies and URLs: every one is a 4xx JSON error that names the problem, never a 500.

YAML scalars PyYAML cannot build, JSON nested past the parser on every route that reads
JSON, NUL bytes in ids, names and query strings, and each route's own body limit.
"""
from __future__ import annotations

import io

import pytest

from tests.api.conftest import TRAIN, error_of

DEEP = "[" * 100_000 + "]" * 100_000
DEEP_OBJECT = '{"a":' * 50_000 + "1" + "}" * 50_000


@pytest.mark.parametrize("value", [
    "2001-02-30",            # a date PyYAML resolves, then datetime refuses (ValueError)
    "2001-02-29 25:61:61",   # a timestamp that is no time
    "!!float abc",           # ValueError
    "!!bool maybe",          # KeyError in the bool constructor
    "!!int 0xZZ",            # ValueError
    "1" * 5000,              # int() refuses more than 4300 digits (ValueError)
    "!!timestamp 2001-13-01",
    "!!python/object:os.system ls",   # a tag SafeLoader does not know
    "!!set {a, b}",          # builds a set: a 422 from the config check, not a 500
])
def test_yaml_scalars_pyyaml_cannot_build_are_400(client, value):
    body = f"model: {{name: small_cnn}}\ntraining: {{epochs: {value}}}\n"
    resp = client.post("/v1/jobs", data=body, content_type="application/yaml")
    assert resp.status_code in (400, 422), (value, resp.get_data(as_text=True))
    err = error_of(resp, resp.status_code)
    if resp.status_code == 400:
        assert err["code"] == "invalid_yaml" and "YAML" in err["message"]


def test_yaml_full_document_form_too(client):
    body = "kind: train\nconfig:\n  training: {lr: !!float abc}\n"
    err = error_of(client.post("/v1/jobs", data=body, content_type="text/yaml"), 400)
    assert err["code"] == "invalid_yaml" and "ValueError" in err["message"]


@pytest.mark.parametrize("method,url", [
    ("POST", "/v1/jobs"),
    ("POST", "/v1/models"),
    ("PUT", "/v1/models/digits/aliases/production"),
    ("POST", "/v1/tokens"),
])
@pytest.mark.parametrize("body", [DEEP, DEEP_OBJECT], ids=["arrays", "objects"])
def test_deeply_nested_json_is_400_on_every_json_route(client, method, url, body):
    """One guard (web.errors.JSONProvider) covers every request.get_json, silent or not."""
    resp = client.open(url, method=method, data=body, content_type="application/json")
    err = error_of(resp, 400)
    assert err["code"] == "invalid_json" and "nested" in err["message"]


@pytest.mark.parametrize("silent", [False, True])
def test_the_json_guard_covers_any_view(app, silent):
    """What /predict and any later route get from request.get_json on such a body: the 400."""
    from flask import request

    from worker.errors import BadRequest

    with app.test_request_context("/predict", method="POST", data=DEEP, content_type="application/json"):
        with pytest.raises(BadRequest, match="nested too deeply"):
            request.get_json(silent=silent)
    resp = app.test_client().post("/predict?model=nomodel", data=DEEP, content_type="application/json")
    assert 400 <= resp.status_code < 500  # the model is looked up first here (404), never a 500


def test_malformed_json_names_the_problem(client):
    err = error_of(client.post("/v1/tokens", data="{nope", content_type="application/json"), 400)
    assert err["code"] == "invalid_json" and "malformed JSON" in err["message"]


@pytest.mark.parametrize("url", [
    "/v1/jobs/%00", "/v1/jobs/" + "0" * 31 + "%00", "/v1/jobs/" + "0" * 32 + "%00/logs",
    "/v1/datasets/%00abc", "/v1/models/dig%00its", "/v1/models/digits/aliases/pro%00d",
    "/v1/jobs?status=queued%00", "/v1/jobs?k%00=1", "/health?x=%00",
])
def test_nul_in_path_or_query_is_400_before_any_database(client, url):
    method = "PUT" if "/aliases/" in url else "GET"
    resp = client.open(url, method=method, json={"version": 1})
    err = error_of(resp, 400)
    assert err["code"] == "bad_characters"


def test_nul_in_bodies_is_422_naming_the_field(client):
    err = error_of(client.post("/v1/models", json={"name": "digits", "job_id": "a" * 31 + "\x00"}), 422)
    assert [d["field"] for d in err["details"]] == ["job_id"]
    err = error_of(client.post("/v1/jobs", json={"kind": "train", "config": {"data": {"dataset": "ab\x00"}}}), 422)
    assert any(d["field"].startswith("data.dataset") for d in err["details"])
    err = error_of(client.post("/v1/tokens", json={"name": "a\x00b", "scopes": ["read"]}), 422)
    assert [d["field"] for d in err["details"]] == ["name"]


def test_a_name_with_a_trailing_newline_is_refused(client):
    """JSON Schema's '$' is the end of the text; Python's re.search would let 'digits\\n' through."""
    err = error_of(client.post("/v1/tokens", json={"name": "ci\n", "scopes": ["read"]}), 422)
    assert err["details"][0]["field"] == "name"
    err = error_of(client.post("/v1/models", json={"name": "digits\n", "job_id": "0" * 32}), 422)
    assert err["details"][0]["field"] == "name"
    err = error_of(client.get("/v1/jobs?status=queued%0A"), 400)
    assert err["details"][0]["field"] == "status"


def test_each_route_has_the_body_limit_its_content_needs(client, api_settings):
    """JSON bodies are small (1 MiB); the 4 MiB test limit applies to uploads and /predict only."""
    from web.errors import SMALL_BODY_BYTES

    assert SMALL_BODY_BYTES < api_settings.max_request_bytes
    big = b'{"kind": "train", "config": {}, "x": "' + b"a" * (SMALL_BODY_BYTES + 10) + b'"}'
    err = error_of(client.post("/v1/jobs", data=big, content_type="application/json"), 413)
    assert str(SMALL_BODY_BYTES) in err["message"]
    err = error_of(client.post("/v1/tokens", data=big, content_type="application/json"), 413)
    assert str(SMALL_BODY_BYTES) in err["message"]
    # a chunked body (no Content-Length) is cut at the same limit
    resp = client.post("/v1/jobs", input_stream=io.BytesIO(big), content_type="application/json",
                       environ_overrides={"wsgi.input_terminated": True})
    assert error_of(resp, 413)
    # an upload of the same size reaches the zip check instead (422: not a zip)
    resp = client.post("/v1/datasets", data=big, content_type="application/zip")
    assert error_of(resp, 422)["code"] == "not_a_zip"


def test_huge_integers_in_json_job_configs_are_4xx(client):
    for value in ("9" * 400, "-" + "9" * 400, "1e400"):
        body = '{"kind": "train", "config": {"training": {"lr": ' + value + ', "epochs": ' + value + "}}}"
        resp = client.post("/v1/jobs", data=body, content_type="application/json")
        assert 400 <= resp.status_code < 500, (value, resp.get_data(as_text=True))
        error_of(resp, resp.status_code)
    ok = client.post("/v1/jobs", json={"kind": "train", "config": TRAIN})
    assert ok.status_code == 202
