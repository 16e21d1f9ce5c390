"""POST /predict: check and decode inputs in the request thread, classify them in the forward process.

Every input's size is known before any is decoded (image headers, list lengths), so a request
over its pixel budget costs no memory; inputs are then decoded one at a time, each shrunk to
the model's size before the next. One bad image fails only its own request; the web process
never imports torch (web/serving/).
"""
from __future__ import annotations

import base64
import binascii
import json
import re
import warnings
from concurrent.futures import TimeoutError as FutureTimeout

import numpy as np
from flask import Blueprint, current_app, request
from PIL import Image

from configs.names import MODEL_REF_RE
from ml import images
from web import context
from web.metrics import observe_batch, observe_inputs, observe_queue_wait
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
QUEUE_FULL_RETRY_S = 1    # Retry-After when a model's queue is full: it drains in well under a second


def pixel_budget(settings) -> int:
    """Decoded pixels one request may hold (Settings.max_predict_pixels; default 32 Mpx: one large
    photo or 64 inputs of 724x724, at most ~128 MiB decoded)."""
    return settings.max_predict_pixels


# ---------------------------------------------------------------- inputs

def _b64(text: str, index: int) -> bytes:
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"input {index}: string is not valid base64", code="invalid_base64") from None


def _open(data: bytes, index: int, max_pixels: int) -> Image.Image:
    """Bytes -> a PIL image of an allowed format whose header only has been read (4xx names the problem)."""
    if not data:
        raise InvalidInput(f"input {index}: empty image", code="empty_image")
    try:
        return images.open_image(data, max_pixels, f"input {index}")
    except images.ImageError as exc:
        raise InvalidInput(str(exc), code=exc.code) from None


def _numbers(value: list, index: int) -> int:
    """Nested lists of numbers (JSON pixel arrays) -> how many numbers; the shape is checked when decoded.

    Iterative, one level at a time (no recursion on client data), and only four levels deep.
    """
    level = [value]
    for _ in range(4):
        kinds: set[type] = set()
        for items in level:
            kinds.update(map(type, items))
        if kinds <= {int, float}:
            return sum(map(len, level))
        if kinds != {list}:
            other = sorted(k.__name__ for k in kinds - {int, float, list})
            if other:
                raise InvalidInput(f"input {index}: pixel arrays hold numbers, found {other[0]}", code="bad_shape")
            raise InvalidInput(f"input {index}: numbers and lists side by side; expected [H][W] or [H][W][C] "
                               "nested lists (a rectangular array)", code="bad_shape")
        level = [v for items in level for v in items]
    raise InvalidInput(f"input {index}: too deeply nested; expected [H][W] or [H][W][C]", code="bad_shape")


def _body_items(settings) -> list:
    """The request's raw inputs in order: bytes (encoded images), str (base64) or nested lists."""
    mimetype = request.mimetype or ""
    if mimetype == "multipart/form-data":
        items = [f.read() for f in request.files.getlist("image")]
        if not items:
            raise BadRequest("multipart body has no `image` field; send files as image=@file.png")
        return items
    if mimetype.startswith("image/") or mimetype == "application/octet-stream":
        return [request.get_data(cache=False)]
    if mimetype == "application/json":
        # Every number of a pixel array but the last of a row is followed by a comma: a body with
        # more commas than the budget has pixels is refused before parsing makes an object of each.
        commas = request.get_data(cache=True).count(b",")
        if commas > pixel_budget(settings) + 4 * settings.max_predict_images:
            raise _over_budget(commas, pixel_budget(settings), "comma-separated JSON values")
        body = request.get_json()  # malformed or too deeply nested: 400 from web/errors
        if not isinstance(body, dict) or not isinstance(body.get("instances"), list):
            raise BadRequest('JSON body must be {"instances": [...]} with base64 images or pixel arrays')
        return body["instances"]
    raise UnsupportedMediaType(f"unsupported content type {mimetype or '(none)'}; send multipart "
                               "`image` fields, a raw image/* body or JSON {\"instances\": [...]}")


def _over_budget(total: int, budget: int, what: str = "pixels") -> PayloadTooLarge:
    return PayloadTooLarge(f"the request holds {total} {what}; the limit per request is {budget} "
                           "(KILN_MAX_PREDICT_PIXELS): send fewer or smaller images", code="too_many_pixels",
                           details={"pixels": total, "limit": budget})


def read_inputs(settings) -> list:
    """The request's inputs, in order: PIL images (headers read, pixels not decoded) or nested pixel lists.

    Refuses, before decoding anything, more than ``max_predict_images`` inputs, an image over
    ``max_image_pixels`` and a request whose inputs hold more than the pixel budget.
    """
    items = _body_items(settings)
    if not items:
        raise BadRequest("no inputs: send at least one image")
    limit = settings.max_predict_images
    if len(items) > limit:
        raise InvalidInput(f"{len(items)} images in one request; the limit is {limit}", code="too_many_images")
    budget = pixel_budget(settings)
    per_image = min(settings.max_image_pixels, budget)
    out, total = [], 0
    for i, item in enumerate(items):
        if isinstance(item, dict) and isinstance(item.get("b64"), str):
            item = item["b64"]
        if isinstance(item, (bytes, bytearray)):
            item = _open(bytes(item), i, per_image)
        elif isinstance(item, str):
            item = _open(_b64(item, i), i, per_image)
        elif not isinstance(item, list):
            raise InvalidInput(f"input {i}: expected a base64 image string or a nested list of pixels, "
                               f"got {type(item).__name__}", code="bad_input")
        total += item.width * item.height if isinstance(item, Image.Image) else _numbers(item, i)
        if total > budget:
            raise _over_budget(total, budget)
        out.append(item)
    return out


def _prepare(served, inputs: list) -> np.ndarray:
    """The inputs decoded one at a time through ``served``'s eval transform (size, channels): uint8 [N,S,S,C].

    Each image is shrunk and closed before the next is decoded: at most one full-size image in memory.
    """
    arrays = []
    for i, x in enumerate(inputs):
        try:
            if isinstance(x, Image.Image):
                with x:
                    arrays.append(served.model.prepare(images.load_image(x, f"input {i}"), i))
            else:
                arrays.append(served.model.prepare(x, i))
        except images.ImageError as exc:
            raise InvalidInput(str(exc), code=exc.code) from None
        except ValueError as exc:
            raise InvalidInput(str(exc), code="bad_input") from None
    return arrays[0][None] if len(arrays) == 1 else np.stack(arrays)  # one input: a view, no copy


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
    inputs = read_inputs(settings)  # sizes checked before the model is even looked up
    served, rows = _run(ref, inputs)
    body = {"model": {"name": served.name, "version": served.version, "runtime": served.model.runtime},
            "predictions": served.model.label_rows(*rows)}
    return current_app.response_class(json.dumps(body, separators=(",", ":")), mimetype="application/json")


def _run(ref: str, inputs: list):
    """(the Served that answered, its (probabilities, indices) rows) for this request's inputs."""
    try:  # ForwardDied (the forward process died loading it) is a 503 as it is
        served = serving().models.get(ref)
    except ForwardError as exc:
        raise _forward_fault(exc, ref) from exc
    top_k = _query_top_k(len(served.model.classes))
    arrays = _prepare(served, inputs)
    try:  # ForwardDied is Unavailable already: 503 as it is
        future = served.model.submit(arrays, top_k)
        out = future.result(timeout=PREDICT_TIMEOUT_S)
    except ForwardError as exc:
        raise _forward_fault(exc, f"{served.name}:{served.version}") from exc
    except FutureTimeout:
        future.cancel()
        raise Unavailable(f"prediction did not finish within {PREDICT_TIMEOUT_S:g} s; retry") from None
    observe_inputs(served.name, served.version, served.model.runtime, len(arrays))
    if out["first"]:  # one observation per forward pass, whichever web process sent its first input
        observe_batch(out["batch"], out["wait_s"])
    else:
        observe_queue_wait(out["wait_s"])
    return served, (out["values"], out["indices"])


def _forward_fault(exc: ForwardError, model: str) -> Exception:
    """What the client hears when the forward process could not load or run ``model``."""
    if exc.kind == "QueueFull":  # refused at once: the model's queue is full
        return Unavailable(f"model {model} is at capacity ({exc.detail}); retry shortly", code="queue_full",
                           retry_after=QUEUE_FULL_RETRY_S)
    if exc.kind in ("MemoryError", "OutOfMemoryError"):  # transient: retry
        return Unavailable(f"server busy ({exc.kind}: {exc.detail}); retry shortly")
    # a server-side fault on valid input (a corrupt stored model...): 500, its cause in the server log
    return RuntimeError(f"model {model} failed in the forward process: {exc}")
