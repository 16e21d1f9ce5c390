"""One set of handlers: every error leaves as ``{"error": {"code", "message", "details"}}``.

worker.errors' classes, ConfigError (one detail per field), werkzeug's HTTP errors (their
codes taken from the same vocabulary), a dependency that is down (503 naming it, with
Retry-After) and unexpected exceptions (500, logged) alike. The request guards that
apply to every route live here too: a body limit per endpoint, no NUL in paths or query
strings (PostgreSQL text cannot hold one), and JSON nested too deeply for the parser.
"""
from __future__ import annotations

import flask
from flask import current_app, has_request_context, jsonify, request
from flask.json.provider import DefaultJSONProvider
from werkzeug.exceptions import HTTPException

from configs import ConfigError
from worker.errors import BY_STATUS, BadRequest, KilnError, UnsupportedMediaType, unavailable

# Bodies of every route are JSON documents of a few KiB unless listed here; these carry images or zips.
SMALL_BODY_BYTES = 1 << 20
LARGE_BODY_ENDPOINTS = ("datasets.create", "predict.predict")


INTERNAL_MESSAGE = "internal server error; the server log has the details"


def error_document(code: str, message: str, details=None) -> dict:
    """The JSON body of every error: {"error": {"code", "message", "details"}}."""
    return {"error": {"code": code, "message": message, "details": details}}


def describe(exc: Exception, logger) -> tuple[int, dict, dict]:
    """(status, JSON body, headers) for an exception a route raised, outside Flask's handlers too.

    KilnErrors say what they are; a dependency that is down is a 503 naming it (its raw text, which
    may hold hostnames or DSNs, goes to ``logger`` only); anything else is a 500, logged with its trace.
    """
    if not isinstance(exc, KilnError):
        down = unavailable(exc)
        if down is None:
            logger.exception("unhandled error: %s", exc)
            return 500, error_document("internal_error", INTERNAL_MESSAGE), {}
        logger.warning("%s: %s: %s", down.message, type(exc).__name__, exc)
        exc = down
    return exc.status, error_document(exc.code, exc.message, exc.details), exc.headers


def error_response(status: int, code: str, message: str, details=None, headers=None):
    """The JSON error body with its status (and extra headers such as Allow or Retry-After)."""
    resp = jsonify(error_document(code, message, details))
    resp.status_code = status
    for key, value in (headers or {}).items():
        resp.headers[key] = value
    return resp


def body_limit(endpoint: str | None, settings) -> int:
    """The most bytes a request body to ``endpoint`` may have."""
    if endpoint in LARGE_BODY_ENDPOINTS:
        return settings.max_request_bytes
    return min(SMALL_BODY_BYTES, settings.max_request_bytes)


def too_large_message(limit: int | None = None) -> str:
    if limit is None and has_request_context():
        limit = request.max_content_length
    return f"the request body is over the limit of {limit} bytes" if limit else "the request body is too large"


def _error(exc: Exception):
    """Flask's handler for KilnErrors and unexpected exceptions alike (see ``describe``)."""
    status, body, headers = describe(exc, current_app.logger)
    resp = jsonify(body)
    resp.status_code = status
    resp.headers.update(headers)
    return resp


def _config_error(exc: ConfigError):
    return error_response(422, "invalid_config", str(exc), [e.to_dict() for e in exc.errors])


def _http_error(exc: HTTPException):
    status = exc.code or 500
    known = BY_STATUS.get(status)
    code = known.code if known else (exc.name or "error").lower().replace(" ", "_")
    message = exc.description or exc.name
    if status == 413:  # werkzeug's text does not say what the limit is
        message = too_large_message()
    details = None
    headers = {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}
    if status == 405 and "Allow" in headers:
        details = {"allowed": [m.strip() for m in headers["Allow"].split(",")]}
    return error_response(status, code, message, details, headers)


# ------------------------------------------------------------------ request guards

class JSONProvider(DefaultJSONProvider):
    """Flask's JSON, except that a body nested past the parser's depth is a 400, not a RecursionError.

    Every ``request.get_json`` (silent or not) goes through here, so no route can answer 500 for it.
    """

    sort_keys = False

    def loads(self, s, **kwargs):
        try:
            return super().loads(s, **kwargs)
        except RecursionError:
            raise BadRequest("malformed JSON: nested too deeply", code="invalid_json") from None


class Request(flask.Request):
    def on_json_loading_failed(self, e):
        """get_json's failure (when not silent): a 4xx that says what is wrong with the body."""
        if e is None:
            raise UnsupportedMediaType(f"expected an application/json body, got {self.mimetype or '(none)'}")
        raise BadRequest(f"malformed JSON: {e}", code="invalid_json")


def guard_request():
    """before_request: the endpoint's body limit; 400 for a NUL byte in the path or query string."""
    from web.context import settings

    request.max_content_length = body_limit(request.endpoint, settings())
    if "\x00" in request.path:
        raise BadRequest("the URL path contains a NUL byte", [{"field": "path", "message": "contains NUL"}],
                         code="bad_characters")
    for key, value in request.args.items(multi=True):
        if "\x00" in key or "\x00" in value:
            raise BadRequest(f"query parameter {key!r} contains a NUL byte",
                             [{"field": key, "message": "contains NUL"}], code="bad_characters")
    return None


def init_guards(app) -> None:
    """Install the request guards (body limit, NUL) and the JSON parser that refuses deep nesting."""
    app.json = JSONProvider(app)
    app.request_class = Request
    app.before_request(guard_request)


def init_app(app) -> None:
    """Register the JSON error handlers on the app."""
    app.register_error_handler(KilnError, _error)
    app.register_error_handler(ConfigError, _config_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _error)
