"""Access tokens: create, verify, revoke and list rows of the ``tokens`` table.

A token reads ``kiln_<id>_<secret>``: 32 random bytes of secret (256 bits), of which
only the SHA-256 is stored. A fast hash is enough here, unlike for passwords: a
slow KDF only helps against guessing low-entropy secrets, and 2**256 candidates
cannot be guessed at any speed. The id in front lets ``verify`` fetch one row by
primary key and compare hashes with ``hmac.compare_digest`` (constant time).

``verify`` keeps what it read for CACHE_TTL_S seconds, so a request costs no database
read: a token revoked by another process stops working within that time (at once in
the process that revoked it). A token may expire (``expires_at``); its last use is
written at most once per LAST_USED_EVERY_S.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import threading
import time
import uuid
from collections import OrderedDict
from datetime import datetime, timedelta
from pathlib import Path

import sqlalchemy as sa

from configs.names import HEX_ID, TOKEN_NAME_RE
from ml.files import atomic_write
from worker import db
from worker.clock import as_utc, iso, utcnow
from worker.errors import Conflict, InvalidInput, NotFound

SCOPES = ("read", "submit", "predict", "admin")
PREFIX = "kiln_"
TOKEN_RE = re.compile(rf"^{PREFIX}(?P<id>{HEX_ID})_(?P<secret>[A-Za-z0-9_-]{{20,128}})$")
ADMIN_TOKEN_FILE = "admin-token"
CACHE_TTL_S = 5.0  # how long a verified (or refused) token is trusted without reading its row again
CACHE_SIZE = 4096  # entries; refused guesses are cached too, so the oldest go first
LAST_USED_EVERY_S = 60.0
MAX_LIFETIME_S = 10 * 365 * 24 * 3600  # the most expires_in_s may say (ten years)


def hash_secret(secret: str) -> str:
    """Hex SHA-256 of a token's secret part (what the table stores)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_scopes(value) -> list[str]:
    """A list or a comma/space separated string of scopes -> validated, de-duplicated list."""
    items = value.replace(",", " ").split() if isinstance(value, str) else list(value or [])
    bad = [s for s in items if s not in SCOPES]
    if bad or not items:
        raise InvalidInput(f"scope must be one or more of {', '.join(SCOPES)} (got {', '.join(bad) or 'none'})",
                           [{"field": "scope", "message": "one of " + ", ".join(SCOPES)}])
    return list(dict.fromkeys(items))


# What a scope brings with it: admin may do everything; a submitter may follow what it submitted
# (status, logs, metrics, artifacts), so submit implies read.
IMPLIED = {"submit": ("read",)}


def allows(scopes, needed: str) -> bool:
    """Whether a token with these scopes may do what needs ``needed`` (admin implies all, submit read)."""
    return "admin" in scopes or needed in scopes or any(needed in IMPLIED.get(s, ()) for s in scopes)


class TokenStore:
    """Token operations over the job store's ``tokens`` table, with a short verify cache."""

    def __init__(self, engine: sa.Engine, *, cache_ttl_s: float = CACHE_TTL_S, clock=time.monotonic):
        self.engine = engine
        self.table = db.tokens
        self.cache_ttl_s = cache_ttl_s
        self._clock = clock
        self._cache: OrderedDict[tuple[str, str], tuple[float, dict | None, datetime | None]] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings, **kwargs) -> "TokenStore":
        return cls(db.make_engine(settings), **kwargs)

    @staticmethod
    def _row(row) -> dict:
        r = row._mapping if hasattr(row, "_mapping") else row  # a Row or a plain dict of its columns
        return {"id": r["id"], "name": r["name"], "scopes": list(r["scopes"]),
                "created_at": iso(r["created_at"]), "expires_at": iso(r["expires_at"]),
                "last_used_at": iso(r["last_used_at"]), "revoked_at": iso(r["revoked_at"])}

    # ------------------------------------------------------------ operations
    def create(self, name: str, scopes, *, expires_at: datetime | None = None,
               expires_in_s: float | None = None) -> tuple[str, dict]:
        """Create a token; returns (plaintext token, row). The plaintext is not kept anywhere.

        ``expires_in_s`` (seconds from now) or ``expires_at`` (an aware datetime) bound its life.
        """
        if not isinstance(name, str) or not re.fullmatch(TOKEN_NAME_RE, name):
            raise InvalidInput(f"token name {name!r} must be 1-64 letters, digits, '_', '.', '@' or '-'",
                               [{"field": "name", "message": "1-64 letters, digits, '_', '.', '@' or '-'"}])
        scopes = parse_scopes(scopes)
        now = utcnow()
        expires = _expiry(now, expires_at, expires_in_s)
        secret = secrets.token_urlsafe(32)
        values = {"id": uuid.uuid4().hex, "name": name, "hash": hash_secret(secret), "created_at": now,
                  "revoked_at": None, "scopes": scopes, "expires_at": expires, "last_used_at": None}
        t = self.table
        with self.engine.begin() as conn:
            taken = conn.execute(sa.select(t.c.id).where(t.c.name == name, t.c.revoked_at.is_(None))).first()
            if taken:
                raise Conflict(f"an active token named {name!r} exists; revoke it first or pick another name")
            conn.execute(t.insert().values(**values))
            row = conn.execute(sa.select(t).where(t.c.id == values["id"])).one()
        return f"{PREFIX}{values['id']}_{secret}", self._row(row)

    def verify(self, token: str) -> dict | None:
        """The active token's row for a presented token, or None (malformed, unknown, revoked, expired)."""
        m = TOKEN_RE.fullmatch(token or "")
        if not m:
            return None
        key = (m["id"], hash_secret(m["secret"]))
        now = self._clock()
        with self._lock:
            hit = self._cache.get(key)
        if hit is None or now - hit[0] >= self.cache_ttl_s:
            row, expires = self._read(*key)
            with self._lock:
                self._cache[key] = hit = (now, row, expires)
                self._cache.move_to_end(key)
                while len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
        _, row, expires = hit
        if row is None or (expires is not None and expires <= utcnow()):
            return None
        return row

    def _read(self, token_id: str, digest: str) -> tuple[dict | None, datetime | None]:
        t = self.table
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(t).where(t.c.id == token_id)).first()
        expected = row.hash if row is not None else hash_secret("")  # compare anyway: same timing
        ok = hmac.compare_digest(expected, digest)
        if row is None or not ok or row.revoked_at is not None:
            return None, None
        values = dict(row._mapping)
        used, now = as_utc(values["last_used_at"]), utcnow()
        if used is None or (now - used).total_seconds() >= LAST_USED_EVERY_S:
            with self.engine.begin() as conn:
                conn.execute(t.update().where(t.c.id == token_id).values(last_used_at=now))
            values["last_used_at"] = now
        return self._row(values), as_utc(values["expires_at"])

    def forget(self, token_ids) -> None:
        """Drop cached verdicts for these ids (a revoke in this process takes effect at once)."""
        ids = set(token_ids)
        with self._lock:
            for key in [k for k in self._cache if k[0] in ids]:
                del self._cache[key]

    def revoke(self, name_or_id: str) -> list[dict]:
        """Revoke the active token with this id, or every active token with this name."""
        t = self.table
        ident = str(name_or_id).strip()
        with self.engine.begin() as conn:
            rows = conn.execute(sa.select(t).where(sa.or_(t.c.name == ident, t.c.id == ident),
                                                   t.c.revoked_at.is_(None))).all()
            if not rows:
                raise NotFound(f"no active token with name or id {ident!r}; see `flask --app web tokens list`")
            conn.execute(t.update().where(t.c.id.in_([r.id for r in rows])).values(revoked_at=utcnow()))
            rows = conn.execute(sa.select(t).where(t.c.id.in_([r.id for r in rows]))).all()
        self.forget(r.id for r in rows)
        return [self._row(r) for r in rows]

    def revoke_id(self, token_id: str) -> dict:
        """Revoke one active token by its id (the HTTP API's DELETE); NotFound when there is none."""
        if not isinstance(token_id, str) or not re.fullmatch(HEX_ID, token_id):
            raise NotFound(f"no active token {token_id!r}; token ids are 32 hex digits (GET /v1/tokens)")
        t = self.table
        with self.engine.begin() as conn:
            if conn.execute(t.update().where(t.c.id == token_id, t.c.revoked_at.is_(None))
                            .values(revoked_at=utcnow())).rowcount != 1:
                raise NotFound(f"no active token {token_id!r}; GET /v1/tokens lists them")
            row = conn.execute(sa.select(t).where(t.c.id == token_id)).one()
        self.forget([token_id])
        return self._row(row)

    def list(self, include_revoked: bool = True) -> list[dict]:
        """Every token (never its hash), oldest first."""
        t = self.table
        query = sa.select(t).order_by(t.c.created_at, t.c.name)
        if not include_revoked:
            query = query.where(t.c.revoked_at.is_(None))
        with self.engine.connect() as conn:
            return [self._row(r) for r in conn.execute(query)]


def _expiry(now: datetime, expires_at: datetime | None, expires_in_s: float | None) -> datetime | None:
    """When a new token expires (None: never); InvalidInput for both, the past, or over ten years."""
    if expires_at is not None and expires_in_s is not None:
        raise InvalidInput("give expires_in_s or expires_at, not both",
                           [{"field": "expires_at", "message": "not together with expires_in_s"}])
    if expires_in_s is not None:
        if isinstance(expires_in_s, bool) or not 1 <= expires_in_s <= MAX_LIFETIME_S:
            raise InvalidInput(f"expires_in_s must be 1..{MAX_LIFETIME_S} seconds",
                               [{"field": "expires_in_s", "message": f"must be 1..{MAX_LIFETIME_S}"}])
        return now + timedelta(seconds=expires_in_s)
    if expires_at is None:
        return None
    expires_at = as_utc(expires_at)
    if expires_at <= now:
        raise InvalidInput(f"expires_at {iso(expires_at)} is in the past",
                           [{"field": "expires_at", "message": "must be in the future"}])
    return expires_at


def admin_token_path(settings) -> Path:
    return settings.home_path / ADMIN_TOKEN_FILE


def ensure_admin_token(settings, store: TokenStore | None = None) -> str | None:
    """The admin token for `make run`: reuse var/admin-token if still valid, else create one.

    The plaintext lives only in that mode-600 file (so later starts can print it again);
    the table holds its hash. Returns None when auth is disabled.
    """
    if not settings.auth_enabled:
        return None
    store = store or TokenStore.from_settings(settings)
    path = admin_token_path(settings)
    if path.exists():
        token = path.read_text().strip()
        row = store.verify(token)
        if row is not None and "admin" in row["scopes"]:
            os.chmod(path, 0o600)
            return token
    taken = {r["name"] for r in store.list(include_revoked=False)}
    name = next(n for n in ("admin", *(f"admin-{i}" for i in range(2, 10_000))) if n not in taken)
    token, _ = store.create(name, ["admin"])
    atomic_write(path, (token + "\n").encode(), mode=0o600)  # owner-only, like ~/.ssh keys
    return token
