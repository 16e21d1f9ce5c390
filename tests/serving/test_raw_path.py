"""The lean path for a raw-image POST /predict (web.predict.RawImagePath) answers as the Flask route does.

Each case is sent twice, once through the app as it is built and once straight to the Flask app, and
the two answers must match (status, error code and message, headers). A wrapper counts the requests
handed to Flask, so each case also shows which path answered it.
"""
from __future__ import annotations

import dataclasses
import io
import struct
import zlib

import pytest
from prometheus_client import REGISTRY

from tests.serving.conftest import png
from web.predict import RawImagePath


def count_flask(app) -> list:
    """A list that grows by one for every request the lean path hands to the Flask app."""
    hits: list = []
    front = app.wsgi_app
    inner = front.flask

    def counting(environ, start_response):
        hits.append(1)
        return inner(environ, start_response)

    front.flask = counting
    return hits


@pytest.fixture
def flask_hits(app):
    return count_flask(app)


def both(app, flask_hits, url, body, content_type="image/png", headers=None, environ=None):
    """(answer through the app, answer from Flask alone, whether the first reached Flask)."""
    client = app.test_client()
    before = len(flask_hits)
    kwargs = {"data": body, "content_type": content_type, "headers": headers or {}, "environ_overrides": environ or {}}
    lean = client.post(url, **kwargs)
    reached_flask = len(flask_hits) > before
    front = app.wsgi_app
    assert isinstance(front, RawImagePath)
    app.wsgi_app = front.flask
    try:
        plain = client.post(url, **kwargs)
    finally:
        app.wsgi_app = front
    return lean, plain, reached_flask


def same_answer(lean, plain) -> None:
    assert lean.status_code == plain.status_code, (lean.get_data(as_text=True), plain.get_data(as_text=True))
    assert lean.mimetype == plain.mimetype == "application/json"
    a, b = lean.get_json(), plain.get_json()
    if lean.status_code != 200:
        assert a == b
        for header in ("Retry-After", "WWW-Authenticate", "Allow"):
            assert lean.headers.get(header) == plain.headers.get(header), header
        return
    # Labels and indices compare exactly; probabilities come from two forward passes whose batches may
    # hold other inputs (their kernels differ in the last bits by batch size): within 1e-5.
    assert a["model"] == b["model"]
    for p, q in zip(a["predictions"], b["predictions"], strict=True):
        assert (p["label"], p["index"]) == (q["label"], q["index"])
        assert [t["index"] for t in p["top_k"]] == [t["index"] for t in q["top_k"]]
        for s, t in zip(p["top_k"], q["top_k"]):
            assert s["probability"] == pytest.approx(t["probability"], abs=1e-5)


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb's header) and whose data is tiny."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def test_a_raw_image_is_answered_without_flask_and_as_flask_answers(app, flask_hits, digit_pngs):
    for url in ("/predict?model=digits@production", "/predict?model=digits:2&top_k=3",
                "/predict?top_k=1&model=digits&model=ignored", "/predict?model=digits&other=1"):
        lean, plain, reached_flask = both(app, flask_hits, url, digit_pngs[3][0])
        assert lean.status_code == 200 and not reached_flask, url
        same_answer(lean, plain)
    lean, plain, reached_flask = both(app, flask_hits, "/predict?model=digits", digit_pngs[3][0],
                                      content_type="application/octet-stream; charset=binary")
    assert lean.status_code == 200 and not reached_flask
    same_answer(lean, plain)


def test_bad_raw_requests_get_the_same_errors_on_either_path(app, flask_hits, digit_pngs):
    good = digit_pngs[0][0]
    cases = [  # (url, body, content type): each answered by the lean path itself
        ("/predict", good, "image/png"),                              # no model given
        ("/predict?model=..%2Fetc", good, "image/png"),               # not a model reference
        ("/predict?model=nomodel", good, "image/png"),                # no such model
        ("/predict?model=digits:9", good, "image/png"),               # no such version
        ("/predict?model=digits&top_k=0", good, "image/png"),
        ("/predict?model=digits&top_k=abc", good, "image/png"),
        ("/predict?model=d%C3%AFgits", good, "image/png"),            # percent-encoded UTF-8, decoded alike
        ("/predict?model=digits", b"not an image at all", "image/png"),
        ("/predict?model=digits", good[: len(good) // 2], "image/png"),  # truncated
        ("/predict?model=digits", png_claiming(60000, 60000), "image/png"),  # a bomb's header
        ("/predict?model=digits", b"GIF89a" + b"\0" * 40, "image/gif"),
    ]
    for url, body, content_type in cases:
        lean, plain, reached_flask = both(app, flask_hits, url, body, content_type)
        assert 400 <= lean.status_code < 500 and not reached_flask, (url, lean.get_data(as_text=True))
        same_answer(lean, plain)


def test_what_the_lean_path_is_not_sure_of_goes_to_flask(app, flask_hits, digit_pngs, serve_settings):
    good = digit_pngs[0][0]
    over = b"\x89PNG" + b"\0" * (serve_settings.max_request_bytes + 1)
    cases = [
        ("/predict?model=digits", over, "image/png", 413),           # over the body limit
        ("/predict?model=digits", b"", "image/png", 422),            # empty: no Content-Length to take
        ("/predict?model=digits%00", good, "image/png", 400),        # a NUL in the query
        ("/predict?model=digits", good, "text/plain", 415),
        # raw (not percent-encoded) UTF-8 in the query string, as a WSGI server passes it (latin-1 text)
        ("/predict", good, "image/png", 422, {"QUERY_STRING": "model=d\xc3\xafgits"}),
        # a Content-Length that str.isdigit() takes for a number (a superscript two) but int() does not
        ("/predict?model=digits", good, "image/png", 422, {"CONTENT_LENGTH": "\xb2"}),
    ]
    for url, body, content_type, status, *environ in cases:
        lean, plain, reached_flask = both(app, flask_hits, url, body, content_type, environ=environ[0] if environ else None)
        assert lean.status_code == status and reached_flask, (url, lean.get_data(as_text=True))
        same_answer(lean, plain)
    lean, plain, reached_flask = both(app, flask_hits, "/predict?model=digits", good,
                                      headers={"Transfer-Encoding": "chunked"})  # no Content-Length to take
    assert reached_flask
    same_answer(lean, plain)
    before = len(flask_hits)
    multipart = app.test_client().post("/predict?model=digits", data={"image": [(io.BytesIO(good), "a.png")]},
                                       content_type="multipart/form-data")
    assert multipart.status_code == 200 and len(flask_hits) == before + 1


def _requests_counted(status: str) -> float:
    return REGISTRY.get_sample_value("kiln_http_requests_total",
                                     {"method": "POST", "route": "/predict", "status": status}) or 0.0


def test_the_lean_path_counts_and_times_its_requests(client, flask_hits, digit_pngs):
    ok, bad = _requests_counted("200"), _requests_counted("422")
    timed = REGISTRY.get_sample_value("kiln_http_request_duration_seconds_count",
                                      {"method": "POST", "route": "/predict"}) or 0.0
    assert client.post("/predict?model=digits", data=digit_pngs[0][0], content_type="image/png").status_code == 200
    assert client.post("/predict?model=digits&top_k=0", data=digit_pngs[0][0],
                       content_type="image/png").status_code == 422
    assert not flask_hits
    assert _requests_counted("200") == ok + 1 and _requests_counted("422") == bad + 1
    assert REGISTRY.get_sample_value("kiln_http_request_duration_seconds_count",
                                     {"method": "POST", "route": "/predict"}) == timed + 2


def test_a_fault_inside_the_lean_path_is_json(client, flask_hits, digit_pngs, monkeypatch):
    from sqlalchemy.exc import OperationalError

    from web import predict

    def broken(*_):
        raise OperationalError("SELECT 1", {}, Exception("could not connect to db.internal:5432"))

    monkeypatch.setattr(predict, "read_inputs", broken)
    down = client.post("/predict?model=digits", data=digit_pngs[0][0], content_type="image/png")
    assert down.status_code == 503 and down.get_json()["error"]["code"] == "store_unavailable"
    assert down.headers["Retry-After"] and "db.internal" not in down.get_data(as_text=True)

    monkeypatch.setattr(predict, "read_inputs", lambda *_: 1 / 0)
    bug = client.post("/predict?model=digits", data=digit_pngs[0][0], content_type="image/png")
    assert bug.status_code == 500 and bug.get_json()["error"]["code"] == "internal_error"
    assert "ZeroDivisionError" not in bug.get_data(as_text=True) and not flask_hits


def test_tokens_on_the_lean_path(serve_settings, registered, digit_pngs):
    from web import create_app
    from worker.tokens import TokenStore

    settings = dataclasses.replace(serve_settings, auth_enabled=True)
    tokens = TokenStore.from_settings(settings)
    token = {scope: tokens.create(f"t-{scope}", [scope])[0] for scope in ("read", "predict", "admin")}
    tokens.create("t-revoked", ["admin"])
    revoked = tokens.create("t-revoked-2", ["predict"])[0]
    tokens.revoke("t-revoked-2")
    app = create_app(settings)
    app.config["TESTING"] = True
    hits = count_flask(app)
    try:
        cases = [(None, 401, True), ("kiln_" + "0" * 32 + "_" + "x" * 43, 401, True), (revoked, 401, True),
                 (token["read"], 403, True), (token["predict"], 200, False), (token["admin"], 200, False)]
        for value, status, via_flask in cases:
            headers = {"Authorization": f"Bearer {value}"} if value else {}
            lean, plain, reached_flask = both(app, hits, "/predict?model=digits", digit_pngs[1][0], headers=headers)
            assert (lean.status_code, reached_flask) == (status, via_flask), value
            same_answer(lean, plain)
        assert lean.headers.get("WWW-Authenticate") is None
    finally:
        app.extensions["kiln.serving"].close()
        app.extensions["kiln"].close()


def test_png_claiming_makes_the_header_it_claims():
    """png_claiming makes what it says: a header of the size asked for (used above as a bomb)."""
    from PIL import Image

    with Image.open(io.BytesIO(png_claiming(300, 200))) as im:
        assert im.size == (300, 200)
    assert png(Image.new("L", (2, 2)))[:4] == b"\x89PNG"
