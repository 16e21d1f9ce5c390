"""The one clock: aware UTC timestamps, and how they are written to and read from JSON."""
from __future__ import annotations

from datetime import datetime, timezone


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite hands timestamps back naive; they were written as UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=timezone.utc)


def iso(value: datetime | None) -> str | None:
    """'2026-01-01T00:00:00.000Z' (milliseconds, Z for UTC); None stays None."""
    value = as_utc(value)
    return None if value is None else value.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_iso(text: str | None) -> datetime | None:
    """The inverse of ``iso`` (any ISO 8601 text; naive means UTC); None for None or unparsable text."""
    if not text:
        return None
    try:
        return as_utc(datetime.fromisoformat(text))
    except (TypeError, ValueError):
        return None
