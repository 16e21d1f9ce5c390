"""Access tokens: create, verify, revoke and list rows of the ``tokens`` table.

A token reads ``kiln_<id>_<secret>``: 32 random bytes of secret (256 bits), of which
only the SHA-256 is stored. A fast hash is enough here, unlike for passwords: a
slow KDF only helps against guessing low-entropy secrets, and 2**256 candidates
cannot be guessed at any speed. The id in front lets ``verify`` fetch one row by
primary key and compare hashes with ``hmac.compare_digest`` (constant time).
"""
from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import uuid
from pathlib import Path

import sqlalchemy as sa

from configs.names import HEX_ID, TOKEN_NAME_RE
from ml.files import atomic_write
from worker import db
from worker.clock import iso, utcnow
from worker.errors import Conflict, InvalidInput, NotFound

SCOPES = ("read", "submit", "predict", "admin")
PREFIX = "kiln_"
TOKEN_RE = re.compile(rf"^{PREFIX}(?P<id>{HEX_ID})_(?P<secret>[A-Za-z0-9_-]{{20,128}})$")
ADMIN_TOKEN_FILE = "admin-token"


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
    """Token operations over the job store's ``tokens`` table."""

    def __init__(self, engine: sa.Engine):
        self.engine = engine
        self.table = db.tokens

    @classmethod
    def from_settings(cls, settings) -> "TokenStore":
        return cls(db.make_engine(settings))

    @staticmethod
    def _row(row) -> dict:
        return {"id": row.id, "name": row.name, "scopes": list(row.scopes),
                "created_at": iso(row.created_at), "revoked_at": iso(row.revoked_at)}

    # ------------------------------------------------------------ operations
    def create(self, name: str, scopes) -> tuple[str, dict]:
        """Create a token; returns (plaintext token, row). The plaintext is not kept anywhere."""
        if not isinstance(name, str) or not re.fullmatch(TOKEN_NAME_RE, name):
            raise InvalidInput(f"token name {name!r} must be 1-64 letters, digits, '_', '.', '@' or '-'")
        scopes = parse_scopes(scopes)
        secret = secrets.token_urlsafe(32)
        values = {"id": uuid.uuid4().hex, "name": name, "hash": hash_secret(secret), "created_at": utcnow(),
                  "revoked_at": None, "scopes": scopes}
        t = self.table
        with self.engine.begin() as conn:
            taken = conn.execute(sa.select(t.c.id).where(t.c.name == name, t.c.revoked_at.is_(None))).first()
            if taken:
                raise Conflict(f"an active token named {name!r} exists; revoke it first or pick another name")
            conn.execute(t.insert().values(**values))
            row = conn.execute(sa.select(t).where(t.c.id == values["id"])).one()
        return f"{PREFIX}{values['id']}_{secret}", self._row(row)

    def verify(self, token: str) -> dict | None:
        """The active token's row for a presented token, or None (malformed, unknown, revoked)."""
        m = TOKEN_RE.match(token or "")
        if not m:
            return None
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(self.table).where(self.table.c.id == m["id"])).first()
        expected = row.hash if row is not None else hash_secret("")  # compare anyway: same timing
        ok = hmac.compare_digest(expected, hash_secret(m["secret"]))
        if row is None or not ok or row.revoked_at is not None:
            return None
        return self._row(row)

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
        return [self._row(r) for r in rows]

    def list(self, include_revoked: bool = True) -> list[dict]:
        """Every token (never its hash), oldest first."""
        t = self.table
        query = sa.select(t).order_by(t.c.created_at, t.c.name)
        if not include_revoked:
            query = query.where(t.c.revoked_at.is_(None))
        with self.engine.connect() as conn:
            return [self._row(r) for r in conn.execute(query)]


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
