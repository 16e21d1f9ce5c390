"""Property-based: whatever bytes or JSON a client sends, the image decoder raises only ImageError and
/predict and /v1/models answer 2xx or 4xx with a JSON error, never an exception or a 500."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from ml import images

pytestmark = pytest.mark.filterwarnings(
    # Pillow warns about some corrupt files (EXIF, MPO, truncated TIFF tags) and decodes them anyway
    "ignore::UserWarning:PIL.*", "ignore::RuntimeWarning:PIL.*")

HTTP = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])


def _seed(fmt: str, mode: str, size=(6, 5)) -> bytes:
    rng = np.random.default_rng(len(fmt) + len(mode))
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    arr = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    image = Image.fromarray(arr[:, :, 0] if channels == 1 else arr, mode)
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


SEEDS = [_seed(f, m) for f, m in [("PNG", "L"), ("PNG", "RGBA"), ("JPEG", "RGB"), ("BMP", "RGB"), ("PPM", "L"),
                                  ("PPM", "RGB"), ("TIFF", "RGB"), ("WEBP", "RGB"), ("GIF", "L")]]


@st.composite
def mutated(draw) -> bytes:
    """A valid small image of some format with bytes flipped, inserted or cut off."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(["flip", "insert", "delete"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[at] = draw(st.integers(0, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif data:
            del data[at]
    if draw(st.booleans()):
        data = data[:draw(st.integers(0, len(data)))]
    return bytes(data)


@settings(max_examples=400, deadline=None)
@given(data=st.one_of(st.binary(max_size=512), mutated()),
       size=st.sampled_from([8, 16]), channels=st.sampled_from([1, 3]))
def test_the_decoder_raises_only_image_errors(data, size, channels):
    try:
        image = images.load_image(images.open_image(data, max_pixels=1 << 16))
        out = images.prepare(image, 0, size, channels)
    except images.ImageError:
        return
    assert out.dtype == np.uint8 and out.shape == (size, size, channels)


NUMBERS = st.one_of(st.integers(-300, 300), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([10**400, -(10**400), 2**63, 255, 0, 1e308]))
JSON_LEAF = st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=12),
                      st.sampled_from(["", "data:image/png;base64,", "!!!", base64.b64encode(SEEDS[0]).decode()]))
ANY_JSON = st.recursive(JSON_LEAF, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                           st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                        max_leaves=40)
PIXELS = st.one_of(st.lists(st.lists(NUMBERS, min_size=1, max_size=5), min_size=1, max_size=5),
                   st.lists(st.lists(st.lists(NUMBERS, min_size=1, max_size=4), min_size=1, max_size=4),
                            min_size=1, max_size=4))
INSTANCE = st.one_of(PIXELS, ANY_JSON, st.builds(lambda b: base64.b64encode(b).decode(), mutated()),
                     st.builds(lambda b: {"b64": base64.b64encode(b).decode()}, mutated()))
BODY = st.one_of(st.fixed_dictionaries({"instances": st.lists(INSTANCE, max_size=4)}), ANY_JSON)


def check(resp, allowed: set[int]) -> None:
    assert resp.status_code in allowed, (resp.status_code, resp.get_data(as_text=True)[:500])
    if resp.status_code >= 400:
        body = resp.get_json()
        assert set(body["error"]) == {"code", "message", "details"} and body["error"]["message"]


@HTTP
@given(body=BODY)
def test_predict_answers_any_json_with_2xx_or_4xx(client, body):
    check(client.post("/predict?model=digits", data=json.dumps(body), content_type="application/json"),
          {200, 400, 413, 422})


@HTTP
@given(data=st.one_of(mutated(), st.binary(max_size=256)),
       content_type=st.sampled_from(["image/png", "application/octet-stream", "image/x-anything", "text/plain",
                                     "application/json", "multipart/form-data"]))
def test_predict_answers_any_bytes_with_2xx_or_4xx(client, data, content_type):
    check(client.post("/predict?model=digits", data=data, content_type=content_type), {200, 400, 413, 415, 422})
    files = {"image": (io.BytesIO(data), "x.png")}
    check(client.post("/predict?model=digits", data=files, content_type="multipart/form-data"), {200, 400, 413, 422})


@HTTP
@given(body=ANY_JSON, name=st.one_of(st.text(max_size=70), st.sampled_from(["digits", "dig\x00its", "a" * 65])),
       version=st.one_of(NUMBERS, ANY_JSON))
def test_model_routes_answer_any_json_with_4xx(client, body, name, version):
    check(client.post("/v1/models", data=json.dumps(body), content_type="application/json"), {400, 404, 409, 422})
    check(client.post("/v1/models", json={"name": name, "job_id": "0" * 32}), {404, 422})
    check(client.put("/v1/models/digits/aliases/canary", data=json.dumps({"version": version}),
                     content_type="application/json"), {200, 400, 404, 422})
