"""Kiln's error vocabulary: one class per HTTP status it answers with; web/ turns each into JSON.

``status`` is the HTTP status the web layer answers with, ``code`` a stable
machine-readable name (a raise may pass a more specific one, e.g. ``invalid_json``),
``details`` anything structured (e.g. field errors), ``headers`` extra response
headers (``Retry-After``). Every layer above ml/ raises these. ``unavailable(exc)``
turns a dependency's own exception (database, Redis, object store) into the 503
that names the dependency, without its raw text (hostnames, DSNs).
"""
from __future__ import annotations

import sys

RETRY_AFTER_S = 5  # what a 503 or 429 tells the client to wait before trying again


class KilnError(Exception):
    status = 400
    code = "bad_request"

    def __init__(self, message: str, details=None, *, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.message = message
        self.details = details
        self.headers = dict(headers or {})
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


class TooManyRequests(KilnError):
    """A bounded resource (log streams, upload workers) is full; Retry-After says when to try again."""
    status, code = 429, "too_many_requests"

    def __init__(self, message: str, details=None, *, code: str | None = None, headers: dict | None = None,
                 retry_after: int = RETRY_AFTER_S):
        super().__init__(message, details, code=code, headers={"Retry-After": str(retry_after), **(headers or {})})


class Unavailable(KilnError):
    """A dependency (broker, store, storage) cannot be reached right now; Retry-After says when to retry."""
    status, code = 503, "unavailable"

    def __init__(self, message: str, details=None, *, code: str | None = None, headers: dict | None = None,
                 retry_after: int = RETRY_AFTER_S):
        super().__init__(message, details, code=code, headers={"Retry-After": str(retry_after), **(headers or {})})


BY_STATUS = {cls.status: cls for cls in (BadRequest, Unauthorized, Forbidden, NotFound, Conflict, PayloadTooLarge,
                                         UnsupportedMediaType, InvalidInput, TooManyRequests, Unavailable)}

DEPENDENCIES = {"store": "the job store (database)", "broker": "the broker (Redis)",
                "storage": "the artifact storage"}


def _types(module: str, *names: str) -> tuple[type, ...]:
    # Only modules already imported can have raised: nothing is imported here just to classify.
    mod = sys.modules.get(module)
    return tuple(t for t in (getattr(mod, n, None) for n in names) if isinstance(t, type)) if mod else ()


def dependency_of(exc: BaseException) -> str | None:
    """'store', 'broker' or 'storage' when ``exc`` says that dependency is unreachable or timed out."""
    store = _types("sqlalchemy.exc", "OperationalError", "InterfaceError", "TimeoutError", "DisconnectionError")
    broker = (_types("redis.exceptions", "ConnectionError", "TimeoutError", "BusyLoadingError")
              + _types("kombu.exceptions", "OperationalError"))
    storage = _types("botocore.exceptions", "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError")
    for name, types in (("store", store), ("broker", broker), ("storage", storage)):
        if types and isinstance(exc, types):
            return name
    return None


def unavailable(exc: BaseException) -> Unavailable | None:
    """The 503 for a dependency's exception (naming the dependency, not its raw text), or None."""
    name = dependency_of(exc)
    if name is None:
        return None
    return Unavailable(f"{DEPENDENCIES[name]} is unavailable; retry in a few seconds",
                       {"dependency": name}, code=f"{name}_unavailable")
