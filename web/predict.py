"""POST /predict: decode and validate inputs in the request thread, classify them in the forward process.

One bad image fails only its own request; the web process never imports torch (web/serving/).
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import math
import re
import warnings
from concurrent.futures import TimeoutError as FutureTimeout

import numpy as np
from flask import Blueprint, current_app, request
from PIL import Image, UnidentifiedImageError
from werkzeug.exceptions import RequestEntityTooLarge

from configs.schema import MODEL_REF_RE
from web import context
from web.metrics import observe_batch, observe_queue_wait
from web.serving.web_app import serving
from web.serving.web_client import ForwardError
from worker.errors import BadRequest, InvalidInput, PayloadTooLarge, Unavailable, UnsupportedMediaType

bp = Blueprint("predict", __name__)


@bp.record_once
def _bombs_are_errors(state) -> None:
    # PIL only *warns* between MAX_IMAGE_PIXELS and twice that; make it an error we can answer
    # with 422. A filter, not catch_warnings(), because catch_warnings is not thread-safe.
    warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


PREDICT_TIMEOUT_S = 30.0  # a request waits this long for its batch, then answers 503


# ---------------------------------------------------------------- decoding

def decode_image(data: bytes, index: int, max_pixels: int) -> Image.Image:
    """Bytes -> fully decoded PIL image; 4xx errors name the input and the problem."""
    if not data:
        raise InvalidInput(f"input {index}: empty image", code="empty_image")
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
        width, height = image.size
        if width * height > max_pixels:
            raise _too_many_pixels(index, width, height, max_pixels)
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _too_many_pixels(index, None, None, max_pixels) from None
    except UnidentifiedImageError:
        raise InvalidInput(f"input {index}: not an image PIL can read (send PNG, JPEG, ...)",
                           code="not_an_image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidInput(f"input {index}: truncated or corrupt image ({exc})", code="corrupt_image") from None
    return image


def _too_many_pixels(index, width, height, max_pixels) -> InvalidInput:
    size = f" ({width}x{height})" if width else ""
    return InvalidInput(f"input {index}: image{size} has more than {max_pixels} pixels; "
                        "resize it before sending", code="image_too_large")


def _b64(text: str, index: int) -> bytes:
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"input {index}: string is not valid base64", code="invalid_base64") from None


def _check_numbers(value, index: int, depth: int = 0) -> None:
    """Nested lists of finite numbers only (the Predictor checks the shape)."""
    if depth > 3:
        raise InvalidInput(f"input {index}: too deeply nested; expected [H][W] or [H][W][C]", code="bad_shape")
    for v in value:
        if isinstance(v, list):
            _check_numbers(v, index, depth + 1)
        elif isinstance(v, bool) or not isinstance(v, (int, float)):
            raise InvalidInput(f"input {index}: pixel arrays hold numbers, found {type(v).__name__}",
                               code="bad_shape")
        elif not math.isfinite(v):
            raise InvalidInput(f"input {index}: contains NaN or Inf", code="not_finite")


def read_inputs(settings) -> list:
    """The request's inputs, in order: PIL images or nested pixel lists."""
    limit = settings.max_predict_images
    if request.content_length is not None and request.content_length > settings.max_request_bytes:
        raise PayloadTooLarge(f"request body is {request.content_length} bytes; the limit is "
                              f"{settings.max_request_bytes}")
    request.max_content_length = settings.max_request_bytes  # also bounds chunked bodies
    mimetype = request.mimetype or ""
    if mimetype == "multipart/form-data":
        raws = [f.read() for f in request.files.getlist("image")]
        if not raws:
            raise BadRequest("multipart body has no `image` field; send files as image=@file.png")
        items = raws
    elif mimetype.startswith("image/") or mimetype == "application/octet-stream":
        items = [request.get_data(cache=False)]
    elif mimetype == "application/json":
        body = request.get_json(silent=True)
        if not isinstance(body, dict) or not isinstance(body.get("instances"), list):
            raise BadRequest('JSON body must be {"instances": [...]} with base64 images or pixel arrays')
        items = body["instances"]
    else:
        raise UnsupportedMediaType(f"unsupported content type {mimetype or '(none)'}; send multipart "
                                   "`image` fields, a raw image/* body or JSON {\"instances\": [...]}")
    if not items:
        raise BadRequest("no inputs: send at least one image")
    if len(items) > limit:
        raise InvalidInput(f"{len(items)} images in one request; the limit is {limit}", code="too_many_images")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, dict) and isinstance(item.get("b64"), str):
            item = item["b64"]
        if isinstance(item, (bytes, bytearray)):
            out.append(decode_image(bytes(item), i, settings.max_image_pixels))
        elif isinstance(item, str):
            out.append(decode_image(_b64(item, i), i, settings.max_image_pixels))
        elif isinstance(item, list):
            _check_numbers(item, i)
            out.append(item)
        else:
            raise InvalidInput(f"input {i}: expected a base64 image string or a nested list of pixels, "
                               f"got {type(item).__name__}", code="bad_input")
    return out


# ------------------------------------------------------------------- route

def _query_top_k(num_classes: int) -> int:
    raw = request.args.get("top_k", "5")
    if not re.fullmatch(r"[0-9]{1,6}", raw) or int(raw) < 1:
        raise InvalidInput(f"top_k must be a positive integer, got {raw!r}", code="bad_top_k")
    return min(int(raw), num_classes)


@bp.post("/predict")
def predict():
    """Classify one or more images with a registered model (?model=name|name:version|name@alias)."""
    settings = context.settings()
    ref = request.args.get("model") or settings.default_model
    if not ref:
        raise BadRequest("no model given: pass ?model=name, name:version or name@alias "
                         "(or set KILN_DEFAULT_MODEL)")
    if not re.fullmatch(MODEL_REF_RE, ref):
        raise InvalidInput(f"model reference {ref!r} is not name, name:version or name@alias", code="bad_model_ref")
    served, rows = _run(ref, settings)
    body = {"model": {"name": served.name, "version": served.version},
            "predictions": served.model.label_rows(*rows)}
    return current_app.response_class(json.dumps(body, separators=(",", ":")), mimetype="application/json")


def _read(settings) -> list:
    try:
        return read_inputs(settings)
    except RequestEntityTooLarge:
        raise PayloadTooLarge(f"request body is over the limit of {settings.max_request_bytes} bytes") from None


def _prepare(served, inputs: list):
    """The inputs through ``served``'s own eval transform (size, channels): uint8 [N,S,S,C]."""
    try:
        arrays = [served.model.prepare(x, i) for i, x in enumerate(inputs)]
    except ValueError as exc:
        raise InvalidInput(str(exc), code="bad_input") from None
    return arrays[0][None] if len(arrays) == 1 else np.stack(arrays)


def _run(ref: str, settings):
    """(the Served that answered, its (probabilities, indices) rows) for this request's inputs."""
    served = serving().models.get(ref)
    top_k = _query_top_k(len(served.model.classes))
    arrays = _prepare(served, _read(settings))
    try:  # ForwardDied is Unavailable already: 503 as it is
        future = served.model.submit(arrays, top_k)
        out = future.result(timeout=PREDICT_TIMEOUT_S)
    except ForwardError as exc:
        if exc.kind == "QueueFull":
            raise Unavailable(f"server busy: {exc.detail}; retry shortly") from None
        # a server-side fault on valid input: 500, its cause in the server log
        raise RuntimeError(f"model {served.name} version {served.version} failed: {exc}") from exc
    except FutureTimeout:
        future.cancel()
        raise Unavailable(f"prediction did not finish within {PREDICT_TIMEOUT_S:g} s; retry") from None
    if out["first"]:  # one observation per forward pass, whichever web process sent its first input
        observe_batch(out["batch"], out["wait_s"])
    else:
        observe_queue_wait(out["wait_s"])
    return served, (out["values"], out["indices"])
