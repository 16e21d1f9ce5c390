"""One error type and one set of handlers: every error leaves as JSON.

The shape is ``{"error": {"code", "message", "details"}}`` whatever raised it: a
service-layer KilnError, a ConfigError (one detail per bad field), a werkzeug
HTTPException (404, 405, 413, bad JSON ...) or an unexpected exception (500, logged).
"""
from __future__ import annotations

from flask import jsonify
from werkzeug.exceptions import HTTPException

from configs import ConfigError
from worker.errors import KilnError


class ApiError(KilnError):
    """An error raised by the web layer itself, with an explicit HTTP status."""

    def __init__(self, status: int, code: str, message: str, details=None):
        super().__init__(message, details, code=code)
        self.status = status


def error_response(status: int, code: str, message: str, details=None, headers=None):
    """The JSON error body with its status (and extra headers such as Allow)."""
    resp = jsonify({"error": {"code": code, "message": message, "details": details}})
    resp.status_code = status
    for key, value in (headers or {}).items():
        resp.headers[key] = value
    return resp


def _kiln_error(exc: KilnError):
    return error_response(exc.status, exc.code, exc.message, exc.details)


def _config_error(exc: ConfigError):
    return error_response(422, "invalid_config", str(exc), [e.to_dict() for e in exc.errors])


def _http_error(exc: HTTPException):
    status = exc.code or 500
    code = (exc.name or "error").lower().replace(" ", "_")
    message = exc.description or exc.name
    details = None
    headers = {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}
    if status == 405 and "Allow" in headers:
        details = {"allowed": [m.strip() for m in headers["Allow"].split(",")]}
    if status == 413:
        code = "payload_too_large"  # same code as the service layer's PayloadTooLarge
    return error_response(status, code, message, details, headers)


def _unexpected(exc: Exception):
    from flask import current_app

    current_app.logger.exception("unhandled error: %s", exc)
    return error_response(500, "internal_error", "internal server error; the server log has the details")


def init_app(app) -> None:
    """Register the JSON error handlers on the app."""
    app.register_error_handler(KilnError, _kiln_error)
    app.register_error_handler(ConfigError, _config_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected)
