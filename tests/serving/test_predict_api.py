"""POST /predict and /v1/models over the Flask test client, with a real small registered model."""
from __future__ import annotations

import base64
import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

from tests.serving.conftest import png


def error_of(resp, status: int) -> dict:
    assert resp.status_code == status, resp.get_data(as_text=True)
    body = resp.get_json()
    assert set(body["error"]) >= {"code", "message"}
    return body["error"]


def test_multipart_raw_and_json_inputs(client, registered, digit_pngs):
    files = [(io.BytesIO(data), f"{i}.png") for i, (data, _) in enumerate(digit_pngs[:3])]
    resp = client.post("/predict?model=digits@production&top_k=2", data={"image": files},
                       content_type="multipart/form-data")
    assert resp.status_code == 200, resp.get_data(as_text=True)
    body = resp.get_json()
    runtime = registered.resolve_model("digits:1")["card"]["runtime"]["name"]  # what its card chose
    assert body["model"] == {"name": "digits", "version": 1, "runtime": runtime}
    assert len(body["predictions"]) == 3 and all(len(p["top_k"]) == 2 for p in body["predictions"])

    raw = client.post("/predict?model=digits:2", data=digit_pngs[0][0], content_type="image/png")
    assert raw.status_code == 200 and raw.get_json()["model"]["version"] == 2

    instances = [base64.b64encode(digit_pngs[0][0]).decode(), np.zeros((8, 8)).tolist(),
                 {"b64": base64.b64encode(digit_pngs[1][0]).decode()}]
    js = client.post("/predict?model=digits", json={"instances": instances})
    assert js.status_code == 200 and len(js.get_json()["predictions"]) == 3
    # the same image gives the same answer whichever way it is sent. Labels and indices compare
    # exactly; probabilities come from a batch of 3 here and of 1 there, whose kernels differ by
    # CPU and batch size in the last bits: within 1e-5.
    in_batch = js.get_json()["predictions"][0]
    alone = client.post("/predict?model=digits", data=digit_pngs[0][0],
                        content_type="image/png").get_json()["predictions"][0]
    assert (in_batch["label"], in_batch["index"]) == (alone["label"], alone["index"])
    assert [t["index"] for t in in_batch["top_k"]] == [t["index"] for t in alone["top_k"]]
    for a, b in zip(in_batch["top_k"], alone["top_k"]):
        assert a["probability"] == pytest.approx(b["probability"], abs=1e-5)


def test_default_model_and_no_model(client, digit_pngs, serve_settings, registered):
    assert error_of(client.post("/predict", data=digit_pngs[0][0], content_type="image/png"), 400)[
        "message"].startswith("no model given")
    import dataclasses

    from web import create_app

    app = create_app(dataclasses.replace(serve_settings, default_model="digits@production"))
    try:
        resp = app.test_client().post("/predict", data=digit_pngs[0][0], content_type="image/png")
        assert resp.status_code == 200 and resp.get_json()["model"]["version"] == 1
    finally:
        app.extensions["kiln.serving"].close()


def _bomb() -> bytes:
    # 4000x4000 = 16M pixels, above the test limit of 512*512, yet a tiny PNG.
    return png(Image.new("L", (4000, 4000)))


@pytest.mark.parametrize("kwargs, status, word", [
    ({"data": b"definitely not an image", "content_type": "image/png"}, 422, "not an image"),
    ({"data": b"", "content_type": "image/png"}, 422, "empty"),
    ({"data": "<bomb>", "content_type": "image/png"}, 422, "pixels"),
    ({"data": b"x" * (600 * 1024), "content_type": "image/png"}, 413, "limit"),
    ({"json": {"instances": [[[1.0, float("nan")], [0, 0]]]}}, 422, "NaN"),
    ({"data": '{"instances": [[[1, NaN], [0, 0]]]}', "content_type": "application/json"}, 422, "NaN"),
    ({"json": {"instances": [[[[[[1]]]]]]}}, 422, "nested"),
    ({"json": {"instances": [[[[[1]]]]]}}, 422, "shape"),
    ({"json": {"instances": [[[1, 2], [3]]]}}, 422, "rectangular"),
    ({"json": {"instances": [[1, 2, 3]]}}, 422, "shape"),
    ({"json": {"instances": [[["a"]]]}}, 422, "numbers"),
    ({"json": {"instances": ["!!!not base64"]}}, 422, "base64"),
    ({"json": {"instances": []}}, 400, "no inputs"),
    ({"json": {"images": []}}, 400, "instances"),
    ({"json": {"instances": [[[0]]] * 9}}, 422, "limit is 8"),
    ({"data": "hello", "content_type": "text/plain"}, 415, "content type"),
    ({"data": {}, "content_type": "multipart/form-data"}, 400, "image"),
])
def test_bad_inputs_are_4xx_naming_the_problem(client, kwargs, status, word):
    if kwargs.get("data") == "<bomb>":
        kwargs = {**kwargs, "data": _bomb()}
    err = error_of(client.post("/predict?model=digits", **kwargs), status)
    assert word.lower() in err["message"].lower()


def test_truncated_image_and_second_input_named(client, digit_pngs):
    good, _ = digit_pngs[0]
    truncated = png(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)))[:200]
    files = [(io.BytesIO(good), "a.png"), (io.BytesIO(truncated), "b.png")]
    err = error_of(client.post("/predict?model=digits", data={"image": files}, content_type="multipart/form-data"),
                   422)
    assert err["message"].startswith("input 1:") and "truncated" in err["message"]


@pytest.mark.parametrize("ref, status", [("nope", 404), ("digits:9", 404), ("digits@canary", 404),
                                         ("bad ref!", 422)])
def test_unknown_or_bad_model_refs(client, digit_pngs, ref, status):
    error_of(client.post(f"/predict?model={ref}", data=digit_pngs[0][0], content_type="image/png"), status)


def test_bad_top_k(client, digit_pngs):
    error_of(client.post("/predict?model=digits&top_k=zero", data=digit_pngs[0][0], content_type="image/png"), 422)


def test_bad_request_does_not_disturb_concurrent_good_ones(app, digit_pngs):
    failures = []

    def good():
        c = app.test_client()
        for _ in range(5):
            r = c.post("/predict?model=digits", data=digit_pngs[1][0], content_type="image/png")
            if r.status_code != 200:
                failures.append(r.status_code)

    def bad():
        c = app.test_client()
        for _ in range(5):
            r = c.post("/predict?model=digits", json={"instances": [[[0, float("inf")]]]})
            if r.status_code != 422:
                failures.append(("bad", r.status_code))

    threads = [threading.Thread(target=f) for f in (good, bad, good, bad)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


def test_moving_the_alias_switches_the_served_version(client, registered, digit_pngs):
    def version():
        r = client.post("/predict?model=digits@production", data=digit_pngs[0][0], content_type="image/png")
        assert r.status_code == 200
        return r.get_json()["model"]["version"]

    assert version() == 1
    registered.set_alias("digits", "production", 2)
    deadline = time.monotonic() + 30
    seen = set()
    while time.monotonic() < deadline:
        seen.add(version())
        if 2 in seen:
            break
        time.sleep(0.05)
    assert seen <= {1, 2} and 2 in seen


def test_models_api(client, trained):
    listed = client.get("/v1/models").get_json()["models"]
    assert listed[0]["name"] == "digits" and listed[0]["aliases"] == {"production": 1}
    one = client.get("/v1/models/digits").get_json()
    assert [v["version"] for v in one["versions"]] == [1, 2]
    moved = client.put("/v1/models/digits/aliases/staging", json={"version": 2})
    assert moved.status_code == 200 and moved.get_json()["aliases"]["staging"] == 2
    error_of(client.put("/v1/models/digits/aliases/staging", json={"version": 5}), 404)
    error_of(client.put("/v1/models/digits/aliases/staging", json={"version": "2"}), 422)
    error_of(client.get("/v1/models/nope"), 404)
    error_of(client.post("/v1/models", json={"name": "digits", "job_id": "0" * 32}), 404)
    error_of(client.post("/v1/models", json={"name": "digits"}), 422)
    error_of(client.post("/v1/models", json={"name": "bad name", "job_id": "x"}), 422)


def version_runtime(client, version: int) -> str:
    """The runtime the registered version's card names."""
    from worker.registry import Registry

    registry = Registry.from_settings(client.application.config["KILN_SETTINGS"])
    return registry.resolve_model(f"digits:{version}")["card"]["runtime"]["name"]


def test_registering_a_succeeded_job_serves_its_new_version(client, succeeded_job, digit_pngs):
    resp = client.post("/v1/models", json={"name": "digits", "job_id": succeeded_job})
    assert resp.status_code == 201, resp.get_data(as_text=True)
    version = resp.get_json()
    assert version["version"] == 3 and version["job_id"] == succeeded_job and version["checkpoint"] == "best"
    served = client.post("/predict?model=digits:3", data=digit_pngs[0][0], content_type="image/png")
    assert served.status_code == 200
    assert served.get_json()["model"] == {"name": "digits", "version": 3, "runtime": version_runtime(client, 3)}
    missing = error_of(client.post("/v1/models", json={"name": "digits", "job_id": succeeded_job,
                                                       "checkpoint": "last"}), 404)
    assert "no last checkpoint" in missing["message"]


def test_predict_records_batch_size_and_queue_wait(client, digit_pngs):
    from prometheus_client import REGISTRY

    def count(name: str) -> float:
        return REGISTRY.get_sample_value(name) or 0.0

    before = (count("kiln_predict_batch_size_count"), count("kiln_predict_batch_size_sum"),
              count("kiln_predict_queue_wait_seconds_count"))
    files = [(io.BytesIO(data), f"{i}.png") for i, (data, _) in enumerate(digit_pngs[:3])]
    resp = client.post("/predict?model=digits@production", data={"image": files}, content_type="multipart/form-data")
    assert resp.status_code == 200
    after = (count("kiln_predict_batch_size_count"), count("kiln_predict_batch_size_sum"),
             count("kiln_predict_queue_wait_seconds_count"))
    assert after[0] > before[0] and after[1] - before[1] == 3 and after[2] > before[2]
    model = resp.get_json()["model"]  # and the inputs, by the version and runtime that classified them
    labels = {"model": "digits", "version": str(model["version"]), "runtime": model["runtime"]}
    assert REGISTRY.get_sample_value("kiln_predict_inputs_total", labels) >= 3


def test_a_dead_forward_process_costs_one_request_at_most(serve_settings, registered, digit_pngs, tmp_path):
    """kill -9 the forward process: /predict answers 503 at worst, then serves from a new one."""
    import dataclasses
    import os
    import signal
    import tempfile

    from web import create_app

    folder = tempfile.mkdtemp(prefix="kfwd", dir="/tmp")
    app = create_app(dataclasses.replace(serve_settings, forward_socket=os.path.join(folder, "f.sock")))
    client = app.test_client()
    try:
        ok = client.post("/predict?model=digits@production", data=digit_pngs[0][0], content_type="image/png")
        assert ok.status_code == 200, ok.get_data(as_text=True)
        forward = app.extensions["kiln.serving"].forward
        first = forward.ping()
        os.kill(first, signal.SIGKILL)
        statuses = []
        for _ in range(3):
            resp = client.post("/predict?model=digits@production", data=digit_pngs[0][0],
                               content_type="image/png")
            statuses.append(resp.status_code)
            if resp.status_code == 503:
                assert "forward process" in error_of(resp, 503)["message"]
            else:
                assert resp.get_json()["predictions"] == ok.get_json()["predictions"]
        assert statuses[-1] == 200 and statuses.count(503) <= 1, statuses
        assert forward.ping() != first
    finally:
        app.extensions["kiln.serving"].close()
