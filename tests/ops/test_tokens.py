"""worker/tokens.py and the `flask tokens` commands: hashes only, revocation, the admin token file."""
from __future__ import annotations

import dataclasses
import hashlib
import stat

import pytest
import sqlalchemy as sa

from worker.errors import Conflict, InvalidInput, NotFound
from worker.tokens import TokenStore, admin_token_path, allows, ensure_admin_token


def stored_rows(tokens):
    with tokens.engine.connect() as conn:
        return conn.execute(sa.select(tokens.table)).all()


def test_only_the_hash_is_stored(tokens):
    token, row = tokens.create("ci", ["read"])
    assert token.startswith("kiln_") and len(token) > 60
    [db_row] = stored_rows(tokens)
    secret = token.split("_", 2)[2]  # kiln_<id>_<secret>; the secret may contain "_"
    assert db_row.hash == hashlib.sha256(secret.encode()).hexdigest()
    assert secret not in str(tuple(db_row)) and token not in str(tuple(db_row))
    assert "hash" not in row and row["scopes"] == ["read"]
    assert tokens.verify(token)["name"] == "ci"


def test_verify_rejects_malformed_unknown_and_revoked(tokens):
    token, row = tokens.create("ci", ["submit"])
    for bad in ("", "kiln_", token + "x", token.replace("kiln_", "klin_"), "kiln_zz_" + "a" * 43,
                token[:-1] + ("A" if token[-1] != "A" else "B")):
        assert tokens.verify(bad) is None, bad
    assert tokens.revoke(row["id"])[0]["revoked_at"]
    assert tokens.verify(token) is None


def test_names_scopes_and_revoke_by_name(tokens):
    tokens.create("ci", ["read"])
    with pytest.raises(Conflict):
        tokens.create("ci", ["read"])  # an active name is unique, so revoke-by-name is unambiguous
    with pytest.raises(InvalidInput):
        tokens.create("x", ["write"])
    with pytest.raises(InvalidInput):
        tokens.create("bad name!", ["read"])
    assert [r["name"] for r in tokens.revoke("ci")] == ["ci"]
    with pytest.raises(NotFound):
        tokens.revoke("ci")
    tokens.create("ci", ["read", "predict"])  # the name is free again
    assert [r["scopes"] for r in tokens.list(include_revoked=False)] == [["read", "predict"]]
    assert len(tokens.list()) == 2


def test_admin_implies_every_scope():
    assert all(allows(["admin"], s) for s in ("read", "submit", "predict", "admin"))
    assert allows(["read", "predict"], "predict") and not allows(["read"], "submit")


def test_ensure_admin_token_writes_a_private_file_and_reuses_it(auth_settings, tokens):
    token = ensure_admin_token(auth_settings)
    path = admin_token_path(auth_settings)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() == token
    assert tokens.verify(token)["scopes"] == ["admin"]
    assert ensure_admin_token(auth_settings) == token  # later starts print the same one
    tokens.revoke(tokens.verify(token)["id"])
    fresh = ensure_admin_token(auth_settings)  # a revoked file token is replaced
    assert fresh != token and tokens.verify(fresh) is not None
    assert path.read_text().strip() == fresh
    assert ensure_admin_token(dataclasses.replace(auth_settings, auth_enabled=False)) is None


def test_flask_tokens_commands(auth_app, auth_client):
    runner = auth_app.test_cli_runner()
    created = runner.invoke(args=["tokens", "create", "--name", "ci", "--scope", "read", "--scope", "predict"])
    assert created.exit_code == 0, created.output
    token = created.stdout.strip()
    assert token.startswith("kiln_") and "shown only now" in created.stderr
    assert auth_client.get("/v1/jobs", headers={"Authorization": f"Bearer {token}"}).status_code == 200

    listed = runner.invoke(args=["tokens", "list"])
    assert "ci" in listed.output and "read,predict" in listed.output and token not in listed.output
    dup = runner.invoke(args=["tokens", "create", "--name", "ci", "--scope", "read"])
    assert dup.exit_code == 1 and "revoke it first" in dup.stderr
    bad = runner.invoke(args=["tokens", "create", "--name", "x", "--scope", "write"])
    assert bad.exit_code == 2

    revoked = runner.invoke(args=["tokens", "revoke", "ci"])
    assert revoked.exit_code == 0 and "revoked 'ci'" in revoked.output
    assert auth_client.get("/v1/jobs", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    missing = runner.invoke(args=["tokens", "revoke", "nobody"])
    assert missing.exit_code == 1 and "no active token" in missing.stderr


def test_store_works_on_a_fresh_engine(auth_settings):
    """A second TokenStore (another process) sees tokens the first created."""
    token, _ = TokenStore.from_settings(auth_settings).create("other", ["read"])
    assert TokenStore.from_settings(auth_settings).verify(token)["name"] == "other"
