"""Idempotency-Key: a POST repeated with the same key and body gets the first answer again.

Keys belong to one caller (a token id, or "anonymous" when auth is off) and one endpoint. The
first request inserts the key's row (the primary key makes that atomic across processes and
hosts) before it does anything, then stores its answer; a concurrent duplicate finds the row,
waits briefly for the answer and replays it, or answers 409 "in progress". A key seen with
another body is 409. Only successful answers are kept: a request that failed (bad input, a
dependency down) gives its key back, so the client can fix the request and send it again.
Keys expire after Settings.idempotency_ttl_s; a pending row older than ``stale_after_s`` (its
request died with its process) is taken over.
"""
from __future__ import annotations

import hashlib
import re
import time
from datetime import timedelta

import sqlalchemy as sa

from worker import db
from worker.clock import as_utc, utcnow
from worker.errors import BadRequest, Conflict

K = db.idempotency_keys
HEADER = "Idempotency-Key"
KEY_RE = re.compile(r"[\x21-\x7e]{1,255}")  # visible ASCII: what a header carries unchanged
PRINCIPAL_MAX = 64


def check_key(key: str) -> str:
    """The header's value if it is 1..255 visible ASCII characters, else 400 naming the header."""
    if not KEY_RE.fullmatch(key):
        raise BadRequest(f"the {HEADER} header must be 1 to 255 visible ASCII characters (no spaces), "
                         f"got {len(key)} characters", [{"field": HEADER, "message": "1..255 visible ASCII"}],
                         code="bad_idempotency_key")
    return key


def body_digest(*parts: bytes | str) -> str:
    """sha256 over the parts, each length-prefixed (so ("ab", "c") and ("a", "bc") differ)."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(f"{len(data)}:".encode())
        h.update(data)
    return h.hexdigest()


class IdempotencyKeys:
    """Rows of ``idempotency_keys``: begin (claim or replay), complete, release."""

    def __init__(self, engine: sa.Engine, ttl_s: float, *, wait_s: float = 10.0, stale_after_s: float = 900.0):
        self.engine, self.ttl_s, self.wait_s, self.stale_after_s = engine, ttl_s, wait_s, stale_after_s

    def _where(self, principal: str, endpoint: str, key: str) -> tuple:
        return K.c.principal == principal[:PRINCIPAL_MAX], K.c.endpoint == endpoint, K.c.key == key

    def begin(self, principal: str, endpoint: str, key: str, digest: str) -> tuple[int, object] | None:
        """None: this request owns the key now (call complete or release). (status, body): the first
        answer, to replay. Conflict when the key came with another body, or is still in progress."""
        deadline = time.monotonic() + self.wait_s
        while True:
            now = utcnow()
            with self.engine.begin() as conn:  # expired keys of this caller go first: they may be used again
                conn.execute(K.delete().where(K.c.principal == principal[:PRINCIPAL_MAX], K.c.endpoint == endpoint,
                                              K.c.created_at < now - timedelta(seconds=self.ttl_s)))
            try:
                with self.engine.begin() as conn:
                    conn.execute(K.insert().values(principal=principal[:PRINCIPAL_MAX], endpoint=endpoint, key=key,
                                                   body_sha256=digest, status_code=None, response=None,
                                                   created_at=now))
                return None
            except sa.exc.IntegrityError:
                pass  # someone used this key first
            with self.engine.connect() as conn:
                row = conn.execute(sa.select(K).where(*self._where(principal, endpoint, key))).mappings().first()
            if row is None:
                continue  # released or expired meanwhile: claim it again
            if row["body_sha256"] != digest:
                raise Conflict(f"{HEADER} {key!r} was already used with a different request body; "
                               "use a new key for a new request", {"key": key}, code="idempotency_key_reused")
            if row["status_code"] is not None:
                return int(row["status_code"]), row["response"]
            if (now - as_utc(row["created_at"])).total_seconds() > self.stale_after_s:
                self._take_over(principal, endpoint, key, row["created_at"], now)
                continue
            if time.monotonic() >= deadline:
                raise Conflict(f"a request with {HEADER} {key!r} is still in progress; retry it shortly",
                               {"key": key}, code="idempotency_key_in_progress", headers={"Retry-After": "1"})
            time.sleep(0.1)

    def _take_over(self, principal, endpoint, key, created_at, now) -> None:
        with self.engine.begin() as conn:  # only the row that went stale, not one claimed anew meanwhile
            conn.execute(K.delete().where(*self._where(principal, endpoint, key), K.c.status_code.is_(None),
                                          K.c.created_at == created_at))

    def complete(self, principal: str, endpoint: str, key: str, status: int, response) -> None:
        """Store the answer the key replays from now on."""
        with self.engine.begin() as conn:
            conn.execute(K.update().where(*self._where(principal, endpoint, key), K.c.status_code.is_(None))
                         .values(status_code=int(status), response=response))

    def release(self, principal: str, endpoint: str, key: str) -> None:
        """The request failed: forget the pending key so the same key can be sent again."""
        with self.engine.begin() as conn:
            conn.execute(K.delete().where(*self._where(principal, endpoint, key), K.c.status_code.is_(None)))
