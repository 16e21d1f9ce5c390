"""Kiln's error vocabulary: one class per HTTP status it answers with; web/ turns each into JSON.

``status`` is the HTTP status the web layer answers with, ``code`` a stable
machine-readable name (a raise may pass a more specific one, e.g. ``invalid_json``),
``details`` anything structured (e.g. field errors). Every layer above ml/ raises these.
"""
from __future__ import annotations


class KilnError(Exception):
    status = 400
    code = "bad_request"

    def __init__(self, message: str, details=None, *, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.details = details
        if code:
            self.code = code


class BadRequest(KilnError):
    """The request itself is malformed (body, query string, path)."""
    status, code = 400, "bad_request"


class Unauthorized(KilnError):
    status, code = 401, "unauthorized"


class Forbidden(KilnError):
    status, code = 403, "forbidden"


class NotFound(KilnError):
    status, code = 404, "not_found"


class Conflict(KilnError):
    status, code = 409, "conflict"


class PayloadTooLarge(KilnError):
    status, code = 413, "payload_too_large"


class UnsupportedMediaType(KilnError):
    status, code = 415, "unsupported_media_type"


class InvalidInput(KilnError):
    """Well-formed but invalid: one detail per bad field."""
    status, code = 422, "invalid_input"


class Unavailable(KilnError):
    """A dependency (broker, store, storage) cannot be reached right now."""
    status, code = 503, "unavailable"


BY_STATUS = {cls.status: cls for cls in (BadRequest, Unauthorized, Forbidden, NotFound, Conflict, PayloadTooLarge,
                                         UnsupportedMediaType, InvalidInput, Unavailable)}
