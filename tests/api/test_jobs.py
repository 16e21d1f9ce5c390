"""/v1/jobs over the Flask test client: submission, validation, listing, cancel."""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest
import yaml

from tests.api.conftest import TRAIN, error_of

JOB_KEYS = {"id", "kind", "status", "attempts", "progress", "metrics", "config", "error", "worker",
            "created_at", "started_at", "finished_at"}


def test_submit_json_returns_202_with_location(client):
    resp = client.post("/v1/jobs", json={"kind": "train", "config": TRAIN})
    assert resp.status_code == 202, resp.get_data(as_text=True)
    job = resp.get_json()
    assert set(job) >= JOB_KEYS and job["status"] == "queued" and job["kind"] == "train"
    assert resp.headers["Location"].endswith(f"/v1/jobs/{job['id']}")
    got = client.get(f"/v1/jobs/{job['id']}")
    assert got.status_code == 200 and got.get_json()["id"] == job["id"]


@pytest.mark.parametrize("content_type", ["application/yaml", "text/yaml"])
def test_submit_yaml_full_document_and_bare_config(client, content_type):
    full = client.post("/v1/jobs", data=yaml.safe_dump({"kind": "train", "config": TRAIN}), content_type=content_type)
    assert full.status_code == 202, full.get_data(as_text=True)
    bare = client.post("/v1/jobs", data=yaml.safe_dump(TRAIN), content_type=content_type)
    assert bare.status_code == 202 and bare.get_json()["kind"] == "train"
    assert bare.get_json()["config"]["training"]["epochs"] == 1


def stub_build(src, out, *, name, job_id, checkpoint, runtimes=None):
    """The registry's build step without torch: placeholder files and the card fields the registry keeps."""
    for file in ("model.pt", "model.safetensors"):
        Path(out, file).write_bytes(b"stub")
    return {"name": name, "classes": ["0", "1"], "normalization": {"mean": [0.5], "std": [0.5]}, "config": {},
            "metrics": {}, "best": {}, "source": {"job_id": job_id, "checkpoint": checkpoint},
            "sha256": hashlib.sha256(b"stub").hexdigest(), "files": ["model.pt", "model.safetensors", "card.json"]}


@pytest.fixture
def digits_model(kiln, tmp_path):
    """A registered model "digits" with version 1 (alias production) and version 2."""
    ckpt = tmp_path / "best.pt"
    ckpt.write_bytes(b"stub")
    for _ in range(2):
        kiln.registry.register_checkpoint("digits", ckpt, build=stub_build)
    kiln.registry.set_alias("digits", "production", 1)
    return "digits"


@pytest.mark.parametrize("ref", ["digits@production", "digits", "digits:2", "digits:1"])
def test_submit_predict_job(client, digits_model, ref):
    resp = client.post("/v1/jobs", json={"kind": "predict", "config": {
        "model": ref, "data": {"dataset": "digits", "subset": 8}}})
    assert resp.status_code == 202, resp.get_data(as_text=True)
    assert resp.get_json()["kind"] == "predict" and resp.get_json()["config"]["model"] == ref


@pytest.mark.parametrize("ref, words", [
    ("nothing", "no model named 'nothing'"), ("nothing@production", "no model named 'nothing'"),
    ("nothing:1", "no model named 'nothing'"), ("digits:3", "no version 3"), ("digits:999999999", "no version"),
    ("digits@staging", "no alias 'staging'"), ("Digits", "no model named 'Digits'"),
])
def test_predict_job_naming_a_missing_model_version_or_alias_is_422(client, digits_model, ref, words):
    err = error_of(client.post("/v1/jobs", json={"kind": "predict", "config": {
        "model": ref, "data": {"dataset": "digits"}}}), 422)
    assert [d["field"] for d in err["details"]] == ["model"] and words in err["details"][0]["message"]
    assert client.get("/v1/jobs?kind=predict").get_json()["total"] == 0  # nothing was queued


def test_predict_job_with_an_empty_registry_is_422(client):
    err = error_of(client.post("/v1/jobs", json={"kind": "predict", "config": {
        "model": "digits@production", "data": {"dataset": "digits", "subset": 8}}}), 422)
    assert [d["field"] for d in err["details"]] == ["model"]


HUGE = "9" * 400


@pytest.mark.parametrize("body, field", [
    ('{"kind": "train", "config": {"training": {"lr": %s}}}' % HUGE, "training.lr"),
    ('{"kind": "train", "config": {"training": {"grad_clip": -%s}}}' % HUGE, "training.grad_clip"),
    ('{"kind": "train", "config": {"model": {"dropout": %s.5}}}' % HUGE, "model.dropout"),
    ('{"kind": "train", "config": {"data": {"val_split": 1e400}}}', "data.val_split"),
    ('{"kind": "train", "config": {"model": {"num_classes": 1000000000}}}', "model.num_classes"),
    ('{"kind": "train", "config": {"training": {"device": "cuda:99999"}}}', "training.device"),
    ('{"kind": "train", "config": {"training": {"checkpoint_every": %s}}}' % HUGE, "training.checkpoint_every"),
    ('{"kind": "train", "config": {"data": {"dataset": "%s\\n"}}}' % ("0" * 32), "data.dataset"),
    ('{"kind": "predict", "config": {"model": "digits\\n", "data": {"dataset": "digits"}}}', "model"),
    ('{"kind": "predict", "config": {"model": "digits", "data": {"dataset": "digits"}, "device": "cuda:64"}}',
     "device"),
    ('{"kind": "predict", "config": {"model": "digits", "data": {"dataset": "digits", "subset": %s}}}' % HUGE,
     "data.subset"),
])
def test_hostile_numbers_and_names_in_a_config_are_422_field_errors(client, body, field):
    err = error_of(client.post("/v1/jobs", data=body, content_type="application/json"), 422)
    assert [d["field"] for d in err["details"]] == [field]
    assert HUGE not in err["message"] and all(len(d["message"]) < 300 for d in err["details"])


@pytest.mark.parametrize("text, field", [
    ("training: {lr: .nan}", "training.lr"), ("training: {lr: .inf}", "training.lr"),
    ("training: {grad_clip: -.inf}", "training.grad_clip"), ("training: {epochs: 3.5}", "training.epochs"),
    ("training: {warmup_epochs: 1000000000}", "training.warmup_epochs"),
    ("model: {num_classes: %s}" % HUGE, "model.num_classes"),
])
def test_hostile_yaml_values_are_422_field_errors(client, text, field):
    err = error_of(client.post("/v1/jobs", data=text, content_type="application/yaml"), 422)
    assert [d["field"] for d in err["details"]] == [field]


def test_config_with_several_errors_names_each_field(client):
    bad = {"model": {"name": "resnet9000", "dropout": 1.5}, "data": {"image_size": 3, "colour": "red"},
           "training": {"lr": -1, "epochs": "ten"}}
    err = error_of(client.post("/v1/jobs", json={"kind": "train", "config": bad}), 422)
    fields = {d["field"] for d in err["details"]}
    assert fields == {"model.name", "model.dropout", "data.image_size", "data.colour", "training.lr",
                      "training.epochs"}
    assert all(d["message"] for d in err["details"])
    # the same errors from a YAML body
    err = error_of(client.post("/v1/jobs", data=yaml.safe_dump(bad), content_type="application/yaml"), 422)
    assert {d["field"] for d in err["details"]} == fields


@pytest.mark.parametrize("body, field", [
    ({"kind": "train"}, "config"),
    ({"kind": "deploy", "config": {}}, "kind"),
    ({"kind": "train", "config": [1, 2]}, "config"),
    ({"kind": "train", "config": {}, "priority": 10}, "priority"),
    ({"kind": "train", "config": {}, "priority": "high"}, "priority"),
    ({"kind": "train", "config": {}, "urgency": 1}, "urgency"),
    ({"kind": "predict", "config": {"model": "no such ref!"}}, "model"),
])
def test_submission_shape_errors_are_422(client, body, field):
    err = error_of(client.post("/v1/jobs", json=body), 422)
    assert field in {d["field"] for d in err["details"]}


@pytest.mark.parametrize("data, content_type, status, word", [
    ('{"kind": "train", "config": {', "application/json", 400, "malformed JSON"),
    ('{"kind": "train", "config": {"training": {"lr": NaN}}}', "application/json", 400, "NaN"),
    ("[1, 2]", "application/json", 422, "must be a JSON object"),
    ("model: {name: [unclosed", "application/yaml", 400, "malformed YAML"),
    ("just a string", "application/yaml", 400, "mapping"),
    ("", "application/json", 400, "empty"),
    (b"\xff\xfe", "application/json", 400, "UTF-8"),
    ("kind=train", "application/x-www-form-urlencoded", 415, "content type"),
    ("kind: train", "text/plain", 415, "content type"),
])
def test_malformed_bodies(client, data, content_type, status, word):
    err = error_of(client.post("/v1/jobs", data=data, content_type=content_type), status)
    assert word in err["message"]


def test_oversize_body_is_413(client, api_settings):
    big = b'{"kind": "train", "config": {"x": "' + b"a" * api_settings.max_request_bytes + b'"}}'
    err = error_of(client.post("/v1/jobs", data=big, content_type="application/json"), 413)
    assert err["code"] == "payload_too_large"


def test_oversize_stream_without_content_length_is_413(app, api_settings):
    """A chunked body (no Content-Length) is cut off at the limit too."""
    from werkzeug.test import EnvironBuilder

    body = b"a" * (api_settings.max_request_bytes + 1024)
    env = EnvironBuilder(path="/v1/jobs", method="POST", content_type="application/json").get_environ()
    env.pop("CONTENT_LENGTH", None)
    env.update({"wsgi.input": io.BytesIO(body), "wsgi.input_terminated": True, "HTTP_TRANSFER_ENCODING": "chunked"})
    status, body_out = _call(app, env)
    assert status.startswith("413"), (status, body_out)
    assert b'"payload_too_large"' in body_out


def _call(app, environ):
    captured = {}

    def start_response(status, headers, exc_info=None):
        captured["status"] = status

    out = b"".join(app.wsgi_app(environ, start_response))
    return captured["status"], out


def test_list_filters_and_pagination(client):
    ids = [client.post("/v1/jobs", json={"kind": "train", "config": TRAIN}).get_json()["id"] for _ in range(3)]
    page = client.get("/v1/jobs?limit=2").get_json()
    assert page["total"] == 3 and page["limit"] == 2 and page["offset"] == 0 and len(page["jobs"]) == 2
    rest = client.get("/v1/jobs?limit=2&offset=2").get_json()
    assert len(rest["jobs"]) == 1
    assert {j["id"] for j in page["jobs"] + rest["jobs"]} == set(ids)
    assert client.get("/v1/jobs?status=queued&kind=train").get_json()["total"] == 3
    assert client.get("/v1/jobs?kind=predict").get_json()["total"] == 0
    client.post(f"/v1/jobs/{ids[0]}/cancel")
    cancelled = client.get("/v1/jobs?status=cancelled").get_json()
    assert [j["id"] for j in cancelled["jobs"]] == [ids[0]]


@pytest.mark.parametrize("query, field", [
    ("limit=0", "limit"), ("limit=21", "limit"), ("limit=abc", "limit"), ("limit=1.5", "limit"),
    ("offset=-1", "offset"), ("offset=x", "offset"), ("status=done", "status"), ("kind=eval", "kind"),
])
def test_bad_pagination_or_filters_are_400(client, query, field):
    err = error_of(client.get(f"/v1/jobs?{query}"), 400)
    assert [d["field"] for d in err["details"]] == [field]


def test_cancel_queued_job_then_conflict(client, job):
    resp = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert resp.status_code == 200 and resp.get_json()["status"] == "cancelled"
    error_of(client.post(f"/v1/jobs/{job['id']}/cancel"), 409)


@pytest.mark.parametrize("method, suffix", [
    ("get", ""), ("post", "/cancel"), ("get", "/logs"), ("get", "/metrics"), ("get", "/artifacts"),
    ("get", "/artifacts/train.log"),
])
def test_unknown_job_is_404(client, method, suffix):
    err = error_of(getattr(client, method)(f"/v1/jobs/{'0' * 32}{suffix}"), 404)
    assert err["code"] == "not_found"


def test_wrong_method_and_unknown_route(client, job):
    err = error_of(client.patch(f"/v1/jobs/{job['id']}"), 405)
    assert err["code"] == "method_not_allowed" and {"GET", "DELETE"} <= set(err["details"]["allowed"])
    assert error_of(client.put("/v1/jobs"), 405)
    assert error_of(client.get(f"/v1/jobs/{job['id']}/cancel"), 405)
    assert error_of(client.get("/v1/nothing-here"), 404)["code"] == "not_found"


def test_hostile_yaml_and_json_are_400_not_500(client):
    laughs = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 9) + "]\n" for i in range(8))
    bomb = laughs + "model: {name: *i}\n"  # 9**9 strings if expanded
    err = error_of(client.post("/v1/jobs", data=bomb, content_type="application/yaml"), 400)
    assert "aliases" in err["message"]
    deep = "[" * 100_000 + "]" * 100_000
    assert error_of(client.post("/v1/jobs", data=deep, content_type="application/json"), 400)
    assert error_of(client.post("/v1/jobs", data=deep, content_type="application/yaml"), 400)
    huge_int = '{"kind": "train", "config": {"training": {"epochs": ' + "9" * 5000 + "}}}"
    assert error_of(client.post("/v1/jobs", data=huge_int, content_type="application/json"), 400)
    weird = "kind: train\nconfig: {model: {name: !!binary aGVsbG8=}, training: {lr: 2001-12-14}}\n"
    err = error_of(client.post("/v1/jobs", data=weird, content_type="application/yaml"), 422)
    assert {d["field"] for d in err["details"]} == {"model.name", "training.lr"}
