"""Migrations: upgrade to head is idempotent and creates every table; SQLite runs in WAL mode."""
from __future__ import annotations

import sqlalchemy as sa

from worker import db


def test_migrate_creates_all_tables_and_is_idempotent(db_settings):
    db.migrate(db_settings)
    names = set(sa.inspect(db.make_engine(db_settings)).get_table_names())
    assert {"jobs", "job_events", "datasets", "model_versions", "model_aliases", "tokens", "workers",
            "idempotency_keys"} <= names
    assert db.current_revision(db_settings) == "0003"


def test_migration_matches_the_table_definitions(db_settings):
    """The hand-written migration and worker.db's Table objects describe the same columns."""
    inspector = sa.inspect(db.make_engine(db_settings))
    for table in db.metadata.sorted_tables:
        assert {c["name"] for c in inspector.get_columns(table.name)} == set(table.c.keys()), table.name


def test_model_version_is_unique_per_name(db_settings):
    import pytest

    engine = db.make_engine(db_settings)
    row = dict(name="m", version=1, checkpoint="best", card={}, sha256="0" * 64, created_at=sa.func.now())
    with engine.begin() as conn:
        conn.execute(db.model_versions.insert().values(**row))
    with pytest.raises(sa.exc.IntegrityError):
        with engine.begin() as conn:
            conn.execute(db.model_versions.insert().values(**row))


def test_sqlite_is_in_wal_mode_with_busy_timeout(settings):
    db.migrate(settings)
    with db.make_engine(settings).connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000
    db.make_engine(settings).dispose()


def test_cli_upgrade(settings, monkeypatch, capsys):
    for key, value in settings.env().items():
        monkeypatch.setenv(key, value)
    assert db.main(["upgrade"]) == 0
    assert "0003" in capsys.readouterr().out
    assert db.main(["bogus"]) == 2
