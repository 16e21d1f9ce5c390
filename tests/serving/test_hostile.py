"""Hostile clients of /predict and /v1/models over the Flask test client: every answer is a 4xx
(or a 503 with Retry-After) JSON error that names the problem, never a 500."""
from __future__ import annotations

import base64
import dataclasses
import io
import os
import signal
import tempfile
import threading
import time

import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image

from ml import images
from tests.serving.conftest import png
from web import predict as predict_module


def error_of(resp, *statuses: int) -> dict:
    assert resp.status_code in statuses, (resp.status_code, resp.get_data(as_text=True))
    body = resp.get_json()
    assert set(body["error"]) == {"code", "message", "details"}, body
    return body["error"]


def deep(depth: int, leaf: str = "0") -> str:
    return "[" * depth + leaf + "]" * depth


def with_budget(settings, pixels: int):
    """Settings whose /predict pixel budget is ``pixels``."""
    return dataclasses.replace(settings, max_predict_pixels=pixels)


@pytest.fixture
def no_decoding(monkeypatch):
    """Any pixel decoding during the test fails it: refusals must come from headers alone."""
    def refuse(image, where="image"):
        raise AssertionError(f"{where} was decoded")

    monkeypatch.setattr(images, "load_image", refuse)


def served_app(settings):
    from web import create_app

    app = create_app(settings)
    app.config["TESTING"] = True
    return app


def close(app) -> None:
    serving = app.extensions.get("kiln.serving")
    if serving is not None:
        serving.close()


# --------------------------------------------------------------- §2: 4xx, not 500

@pytest.mark.parametrize("pixel, word", [(10**400, "0..255"), (-(10**400), "0..255"), (10**300, "0..255"),
                                         (1e308, "0..255"), (256, "0..255"), (-1, "0..255")])
def test_huge_pixel_numbers_are_422(client, pixel, word):
    body = '{"instances": [[[0, %s], [0, 0]]]}' % pixel
    err = error_of(client.post("/predict?model=digits", data=body, content_type="application/json"), 422)
    assert word in err["message"] and err["message"].startswith("input 0:")


def test_json_integers_past_python_limit_are_400(client):
    body = '{"instances": [[[0, %s], [0, 0]]]}' % ("9" * 5000)
    err = error_of(client.post("/predict?model=digits", data=body, content_type="application/json"), 400)
    assert "JSON" in err["message"]


@pytest.mark.parametrize("method, url", [
    ("post", "/predict?model=digits"), ("post", "/v1/models"), ("put", "/v1/models/digits/aliases/staging"),
])
def test_deeply_nested_json_is_400(client, method, url):
    for depth in (100_000, 3_000):
        resp = getattr(client, method)(url, data=deep(depth), content_type="application/json")
        err = error_of(resp, 400)
        assert "JSON" in err["message"] and err["code"] == "invalid_json"
    inside = '{"instances": [%s]}' % deep(100_000)
    error_of(client.post("/predict?model=digits", data=inside, content_type="application/json"), 400)


def test_nesting_the_parser_accepts_is_still_422(client):
    err = error_of(client.post("/predict?model=digits", data='{"instances": [%s]}' % deep(200),
                               content_type="application/json"), 422)
    assert "nested" in err["message"]
    for body in ({"name": {"a": {"b": {"c": [[[[["x"]]]]]}}}, "job_id": "0" * 32}, {"name": [[["digits"]]]}):
        error_of(client.post("/v1/models", json=body), 422)
    error_of(client.put("/v1/models/digits/aliases/staging", json={"version": [[[[1]]]]}), 422)


@pytest.mark.parametrize("version", [2**63, 2**64 + 1, 10**400, -(2**63), 0, 10**9])
def test_alias_versions_out_of_range_are_422(client, version):
    err = error_of(client.put("/v1/models/digits/aliases/staging", json={"version": version}), 422)
    assert "version" in err["message"]
    assert client.get("/v1/models/digits").get_json()["aliases"] == {"production": 1}


@pytest.fixture
def postgres_nul(registered):
    """The job store refuses NUL in text as PostgreSQL does (SQLite would store it)."""
    def refuse(conn, cursor, statement, parameters, context, executemany):
        rows = parameters if executemany else [parameters]
        for row in rows:
            values = row.values() if isinstance(row, dict) else (row or ())
            if any(isinstance(v, str) and "\x00" in v for v in values):
                raise ValueError("A string literal cannot contain NUL (0x00) characters.")

    sa.event.listen(registered.engine, "before_cursor_execute", refuse)
    yield registered
    sa.event.remove(registered.engine, "before_cursor_execute", refuse)


def test_nul_bytes_never_reach_the_store(client, postgres_nul, succeeded_job):
    checks = [
        (client.post("/v1/models", json={"name": "dig\x00its", "job_id": succeeded_job}), 422, "name"),
        (client.post("/v1/models", json={"name": "digits", "job_id": succeeded_job[:-1] + "\x00"}), 422, "job_id"),
        (client.get("/v1/models/dig%00its"), (400, 404), "NUL"),
        (client.put("/v1/models/dig%00its/aliases/production", json={"version": 1}), (400, 404), "NUL"),
        (client.put("/v1/models/digits/aliases/pro%00d", json={"version": 1}), (400, 404, 422), "NUL"),
        (client.post("/predict?model=dig%00its", data=b"x", content_type="image/png"), (400, 422), "NUL"),
    ]
    for resp, status, word in checks:
        statuses = status if isinstance(status, tuple) else (status,)
        err = error_of(resp, *statuses)
        assert word in err["message"] or word in str(err["details"]) or "name" in err["message"], err
    # and the registry refuses them itself, whatever the web tier let through
    from worker.errors import InvalidInput, NotFound

    with pytest.raises(NotFound, match="not found"):
        postgres_nul.get_model("dig\x00its")
    with pytest.raises(NotFound):
        postgres_nul.set_alias("dig\x00its", "production", 1)
    with pytest.raises(InvalidInput, match="job_id"):
        postgres_nul.register_model("digits", "\x00" * 32)
    with pytest.raises(InvalidInput):
        postgres_nul.resolve_model("digits@pro\x00d")


def test_a_forward_process_dying_while_loading_is_503_with_retry_after(serve_settings, registered, digit_pngs):
    """The forward process is stopped, a request asks it to load a version, then it is killed."""
    folder = tempfile.mkdtemp(prefix="kfwd", dir="/tmp")
    app = served_app(dataclasses.replace(serve_settings, forward_socket=os.path.join(folder, "f.sock")))
    try:
        pid = _serving(app).forward.ping()
        os.kill(pid, signal.SIGSTOP)
        got = {}
        request = threading.Thread(target=lambda: got.setdefault("resp", app.test_client().post(
            "/predict?model=digits:2", data=digit_pngs[0][0], content_type="image/png")))
        request.start()
        time.sleep(1.0)  # the load request is written to the stopped process
        os.kill(pid, signal.SIGKILL)
        request.join(60)
        err = error_of(got["resp"], 503)
        assert "forward process" in err["message"] and int(got["resp"].headers["Retry-After"]) > 0
        ok = app.test_client().post("/predict?model=digits:2", data=digit_pngs[0][0], content_type="image/png")
        assert ok.status_code == 200, ok.get_data(as_text=True)  # the next request starts a new one
    finally:
        close(app)


def _serving(app):
    from web.serving.web_app import serving

    with app.app_context():
        return serving(app)


# ----------------------------------------------------------- §4: memory before decoding

def test_pixels_are_budgeted_per_request_before_decoding(serve_settings, registered, no_decoding, monkeypatch):
    """Images each under the per-image limit, together over the request's budget: 413 from headers alone."""
    settings = with_budget(dataclasses.replace(serve_settings, max_image_pixels=40_000_000,
                                               max_request_bytes=64 << 20), 3_000_000)
    budget = predict_module.pixel_budget(settings)
    side = int((budget // 2) ** 0.5) + 8  # two of these are over the budget, one is not
    big = png(Image.new("L", (side, side)))
    app = served_app(settings)
    try:
        client = app.test_client()
        files = [(io.BytesIO(big), f"{i}.png") for i in range(4)]
        err = error_of(client.post("/predict?model=digits", data={"image": files},
                                   content_type="multipart/form-data"), 413)
        assert err["code"] == "too_many_pixels" and err["details"]["limit"] == budget
        assert str(budget) in err["message"]
        b64 = base64.b64encode(big).decode()
        error_of(client.post("/predict?model=digits", json={"instances": [b64, {"b64": b64}]}), 413)
        one = error_of(client.post("/predict?model=digits", data=png(Image.new("L", (side * 2, side))),
                                   content_type="image/png"), 422)
        assert one["code"] == "image_too_large"  # alone over the budget: that image is too large
    finally:
        close(app)


def test_json_pixel_arrays_count_against_the_budget(serve_settings, registered, monkeypatch):
    settings = with_budget(dataclasses.replace(serve_settings, max_predict_images=64), 10_000)
    app = served_app(settings)
    try:
        client = app.test_client()
        fits = np.zeros((8, 8)).tolist()
        assert client.post("/predict?model=digits", json={"instances": [fits] * 4}).status_code == 200
        over = [np.zeros((50, 50)).tolist()] * 4 + [np.zeros((10, 10)).tolist()]  # 10,100 numbers
        err = error_of(client.post("/predict?model=digits", json={"instances": over}), 413)
        assert err["code"] == "too_many_pixels" and err["details"] == {"pixels": 10_100, "limit": 10_000}
        # a body with more commas than the budget is refused before it is parsed
        flat = '{"instances": [[%s]]}' % ",".join(["0"] * 20_000)
        err = error_of(client.post("/predict?model=digits", data=flat, content_type="application/json"), 413)
        assert "JSON values" in err["message"]
    finally:
        close(app)


def test_the_issue_case_64_images_just_under_the_limit(serve_settings, registered, no_decoding):
    """64 images just under the per-image limit (default 40 Mpx): refused from a few MB of PNG."""
    from configs import Settings

    defaults = Settings()
    settings = dataclasses.replace(serve_settings, max_image_pixels=defaults.max_image_pixels,
                                   max_predict_images=defaults.max_predict_images, max_request_bytes=64 << 20)
    side = int(min(defaults.max_image_pixels, predict_module.pixel_budget(settings)) ** 0.5) - 1
    bomb = png(Image.new("1", (side, side)))
    app = served_app(settings)
    try:
        files = [(io.BytesIO(bomb), f"{i}.png") for i in range(defaults.max_predict_images)]
        err = error_of(app.test_client().post("/predict?model=digits", data={"image": files},
                                              content_type="multipart/form-data"), 413)
        assert err["code"] == "too_many_pixels"
    finally:
        close(app)


def _encoded(fmt: str, mode: str = "RGB", **save) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (8, 8), 200 if mode == "L" else (200, 10, 10)).save(buf, fmt, **save)
    return buf.getvalue()


@pytest.mark.parametrize("fmt, mode", [("PNG", "RGB"), ("JPEG", "RGB"), ("BMP", "RGB"), ("PPM", "RGB"),
                                       ("PPM", "L"), ("TIFF", "RGB"), ("WEBP", "RGB")])
def test_the_allowed_formats_are_served(client, fmt, mode):
    resp = client.post("/predict?model=digits", data=_encoded(fmt, mode), content_type="application/octet-stream")
    assert resp.status_code == 200, resp.get_data(as_text=True)


EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\n"
       b"newpath 0 0 moveto 8 8 lineto stroke showpage\n%%EOF\n")


@pytest.mark.parametrize("data", [EPS, _encoded("GIF", "P"), _encoded("ICO"), _encoded("TGA"), _encoded("PCX"),
                                  _encoded("SGI"), _encoded("DDS", "RGBA")],
                         ids=["eps", "gif", "ico", "tga", "pcx", "sgi", "dds"])
def test_other_formats_are_refused_without_their_plugin(client, data, monkeypatch):
    from PIL import EpsImagePlugin

    def no_ghostscript(*args, **kwargs):
        raise AssertionError("Ghostscript ran")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", no_ghostscript)
    err = error_of(client.post("/predict?model=digits", data=data, content_type="image/png"), 422)
    assert err["code"] == "not_an_image" and "PNG, JPEG" in err["message"]
    err = error_of(client.post("/predict?model=digits", json={"instances": [base64.b64encode(data).decode()]}), 422)
    assert err["code"] == "not_an_image"


def test_formats_match_the_image_extensions_training_lists():
    """ml.folders' extensions (what training and batch prediction list) open as exactly FORMATS."""
    from ml.folders import IMAGE_EXTENSIONS

    registered = Image.registered_extensions()
    assert {registered[ext] for ext in IMAGE_EXTENSIONS} == set(images.FORMATS)
