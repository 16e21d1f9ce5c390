"""One set of handlers: every error leaves as ``{"error": {"code", "message", "details"}}``.

worker.errors' classes, ConfigError (one detail per field), werkzeug's HTTP errors (their
codes taken from the same vocabulary) and unexpected exceptions (500, logged) alike.
"""
from __future__ import annotations

from flask import current_app, jsonify
from werkzeug.exceptions import HTTPException

from configs import ConfigError
from worker.errors import BY_STATUS, KilnError


def error_response(status: int, code: str, message: str, details=None, headers=None):
    """The JSON error body with its status (and extra headers such as Allow)."""
    resp = jsonify({"error": {"code": code, "message": message, "details": details}})
    resp.status_code = status
    for key, value in (headers or {}).items():
        resp.headers[key] = value
    return resp


def too_large_message(limit: int | None) -> str:
    return f"the request body is over the limit of {limit} bytes" if limit else "the request body is too large"


def _kiln_error(exc: KilnError):
    return error_response(exc.status, exc.code, exc.message, exc.details)


def _config_error(exc: ConfigError):
    return error_response(422, "invalid_config", str(exc), [e.to_dict() for e in exc.errors])


def _http_error(exc: HTTPException):
    status = exc.code or 500
    known = BY_STATUS.get(status)
    code = known.code if known else (exc.name or "error").lower().replace(" ", "_")
    message = exc.description or exc.name
    if status == 413:  # werkzeug's text does not say what the limit is
        message = too_large_message(current_app.config.get("MAX_CONTENT_LENGTH"))
    details = None
    headers = {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}
    if status == 405 and "Allow" in headers:
        details = {"allowed": [m.strip() for m in headers["Allow"].split(",")]}
    return error_response(status, code, message, details, headers)


def _unexpected(exc: Exception):
    current_app.logger.exception("unhandled error: %s", exc)
    return error_response(500, "internal_error", "internal server error; the server log has the details")


def init_app(app) -> None:
    """Register the JSON error handlers on the app."""
    app.register_error_handler(KilnError, _kiln_error)
    app.register_error_handler(ConfigError, _config_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected)
