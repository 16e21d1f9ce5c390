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
import time
import warnings
from concurrent.futures import TimeoutError as FutureTimeout
from urllib.parse import parse_qsl

import numpy as np
from flask import Blueprint, current_app, request
from PIL import Image
from werkzeug.http import HTTP_STATUS_CODES

from configs.names import MODEL_REF_RE
from ml import images
from web import auth, context, errors
from web.metrics import observe_batch, observe_inputs, observe_queue_wait, record_request
from web.serving.web_app import serving
from web.serving.web_client import ForwardError
from worker.errors import BadRequest, InvalidInput, PayloadTooLarge, Unavailable, UnsupportedMediaType

bp = Blueprint("predict", __name__)
ENDPOINT = "predict.predict"


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


def raw_image_type(mimetype: str) -> bool:
    """Whether a body of this (lower-case) media type is one raw encoded image."""
    return mimetype.startswith("image/") or mimetype == "application/octet-stream"


def _body_items(settings) -> list:
    """The request's raw inputs in order: bytes (encoded images), str (base64) or nested lists."""
    mimetype = request.mimetype or ""
    if mimetype == "multipart/form-data":
        items = [f.read() for f in request.files.getlist("image")]
        if not items:
            raise BadRequest("multipart body has no `image` field; send files as image=@file.png")
        return items
    if raw_image_type(mimetype):
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


def read_inputs(items: list, settings) -> list:
    """The raw ``items`` (bytes, base64 str or nested lists) as inputs, in order: PIL images (headers read,
    pixels not decoded) or nested pixel lists.

    Refuses, before decoding anything, more than ``max_predict_images`` inputs, an image over
    ``max_image_pixels`` and a request whose inputs hold more than the pixel budget.
    """
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

def model_ref(raw: str | None, settings) -> str:
    """The ?model= reference (KILN_DEFAULT_MODEL when absent), checked before anything is read."""
    ref = raw or settings.default_model
    if not ref:
        raise BadRequest("no model given: pass ?model=name, name:version or name@alias "
                         "(or set KILN_DEFAULT_MODEL)")
    if not re.fullmatch(MODEL_REF_RE, ref):
        raise InvalidInput(f"model reference {ref!r} is not name, name:version or name@alias", code="bad_model_ref")
    return ref


def top_k(raw: str | None, num_classes: int) -> int:
    """The ?top_k= query value (5 when absent), at most the model's class count."""
    raw = "5" if raw is None else raw
    if not re.fullmatch(r"[0-9]{1,6}", raw) or int(raw) < 1:
        raise InvalidInput(f"top_k must be a positive integer, got {raw!r}", code="bad_top_k")
    return min(int(raw), num_classes)


@bp.post("/predict")
def predict():
    """Classify one or more images with a registered model (?model=name|name:version|name@alias)."""
    settings = context.settings()
    ref = model_ref(request.args.get("model"), settings)
    inputs = read_inputs(_body_items(settings), settings)  # sizes checked before the model is even looked up
    body = answer(current_app, ref, inputs, request.args.get("top_k"))
    return current_app.response_class(body, mimetype="application/json")


def answer(app, ref: str, inputs: list, raw_top_k: str | None) -> bytes:
    """The JSON answer for ``inputs`` classified by the model ``ref`` names (4xx/503 as KilnError)."""
    try:  # ForwardDied (the forward process died loading it) is a 503 as it is
        served = serving(app).models.get(ref)
    except ForwardError as exc:
        raise _forward_fault(exc, ref) from exc
    k = top_k(raw_top_k, len(served.model.classes))
    arrays = _prepare(served, inputs)
    try:  # ForwardDied is Unavailable already: 503 as it is
        future = served.model.submit(arrays, k)
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
    body = {"model": {"name": served.name, "version": served.version, "runtime": served.model.runtime},
            "predictions": served.model.label_rows(out["values"], out["indices"])}
    return json.dumps(body, separators=(",", ":")).encode()


def _forward_fault(exc: ForwardError, model: str) -> Exception:
    """What the client hears when the forward process could not load or run ``model``."""
    if exc.kind == "QueueFull":  # refused at once: the model's queue is full
        return Unavailable(f"model {model} is at capacity ({exc.detail}); retry shortly", code="queue_full",
                           retry_after=QUEUE_FULL_RETRY_S)
    if exc.kind in ("MemoryError", "OutOfMemoryError"):  # transient: retry
        return Unavailable(f"server busy ({exc.kind}: {exc.detail}); retry shortly")
    # a server-side fault on valid input (a corrupt stored model...): 500, its cause in the server log
    return RuntimeError(f"model {model} failed in the forward process: {exc}")


# ------------------------------------------------------------ lean path

class RawImagePath:
    """WSGI in front of the Flask app: a plain ``POST /predict`` of one raw image body is answered here.

    That request is the one clients send at high rates, and Flask's per-request machinery (request
    context, routing, hooks, response objects) cost more CPU than everything /predict itself does.
    This path runs the same steps in the same order — the body limit, the NUL check, the token's
    scope, the model reference, the image checks, the forward pass — with the same functions, times
    the request into the same metrics and answers errors with the same JSON. Any request it is not
    sure of before reading the body (another route or method, multipart or JSON, no Content-Length,
    a body over the limit, an unusual query string, a token that is missing, refused or cannot be
    checked) goes to Flask, which answers it as it always has.
    """

    def __init__(self, app):
        self.app, self.flask = app, app.wsgi_app
        self.settings = context.settings(app)
        self.limit = errors.body_limit(ENDPOINT, self.settings)

    def __call__(self, environ, start_response):
        length = self._length(environ)
        query = None if length is None else self._query(environ.get("QUERY_STRING", ""))
        if query is None or not auth.granted(self.app, environ.get("HTTP_AUTHORIZATION", ""), ENDPOINT):
            return self.flask(environ, start_response)
        t0 = time.perf_counter()
        try:
            ref = model_ref(query.get("model"), self.settings)
            data = environ["wsgi.input"].read(length)
            if len(data) != length:
                raise BadRequest(f"the request body ended after {len(data)} of its {length} bytes")
            body = answer(self.app, ref, read_inputs([data], self.settings), query.get("top_k"))
            status, headers = 200, {}
        except Exception as exc:  # noqa: BLE001 - every error leaves as JSON, as from Flask's handlers
            status, document, headers = errors.describe(exc, self.app.logger)
            body = json.dumps(document, separators=(",", ":")).encode()
        record_request("POST", "/predict", status, t0)
        start_response(f"{status} {HTTP_STATUS_CODES.get(status, 'Error')}",
                       [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                        *headers.items()])
        return [body]

    def _length(self, environ) -> int | None:
        """The body's length when this is a POST /predict of one raw image within the body limit, else None."""
        if environ.get("PATH_INFO") != "/predict" or environ.get("REQUEST_METHOD") != "POST":
            return None
        mimetype = environ.get("CONTENT_TYPE", "").partition(";")[0].strip().lower()
        if not raw_image_type(mimetype):
            return None
        raw = environ.get("CONTENT_LENGTH", "")
        if not (raw.isascii() and raw.isdigit()) or "HTTP_TRANSFER_ENCODING" in environ:
            return None
        length = int(raw)
        return length if 0 < length <= self.limit else None

    @staticmethod
    def _query(text: str) -> dict[str, str] | None:
        """The query's parameters (the first of each name), or None for one that Flask should read:
        not ASCII, or holding a NUL."""
        if not text.isascii():
            return None
        out: dict[str, str] = {}
        for key, value in parse_qsl(text, keep_blank_values=True):
            if "\x00" in key or "\x00" in value:
                return None
            out.setdefault(key, value)
        return out


def install(app) -> None:
    """Put the lean path in front of ``app``'s WSGI callable (the Flask app serves everything else)."""
    app.wsgi_app = RawImagePath(app)
