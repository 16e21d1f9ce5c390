"""Errors the service layer raises; web/ turns each into the JSON error shape.

``status`` is the HTTP status the web layer answers with, ``code`` a stable
machine-readable name, ``details`` anything structured (e.g. field errors).
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


class InvalidInput(KilnError):
    status, code = 422, "invalid_input"


class NotFound(KilnError):
    status, code = 404, "not_found"


class Conflict(KilnError):
    status, code = 409, "conflict"


class PayloadTooLarge(KilnError):
    status, code = 413, "payload_too_large"


class Unavailable(KilnError):
    """A dependency (broker, store, storage) cannot be reached right now."""
    status, code = 503, "unavailable"
