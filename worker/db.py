"""The job store's tables (SQLAlchemy 2 Core), engines and programmatic Alembic migrations.

SQLite (WAL, busy_timeout) is the embedded default; PostgreSQL when DATABASE_URL says
so (``postgresql+psycopg://``). ``migrate(settings)`` upgrades to head; ``python -m
worker.db upgrade`` does the same from a shell (the Procfile's release step).
"""
from __future__ import annotations

import sys
import threading
from pathlib import Path

import sqlalchemy as sa

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
metadata = sa.MetaData()
TS = sa.DateTime(timezone=True)  # timestamptz on PostgreSQL; SQLite keeps the UTC text

jobs = sa.Table(
    "jobs", metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("config", sa.JSON, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("max_attempts", sa.Integer, nullable=False, default=3),
    sa.Column("progress", sa.JSON),
    sa.Column("metrics_latest", sa.JSON),
    sa.Column("metrics_best", sa.JSON),
    sa.Column("error", sa.Text),
    sa.Column("worker", sa.String(255)),
    sa.Column("lease_owner", sa.String(255)),
    sa.Column("lease_expires", TS),
    sa.Column("heartbeat_at", TS),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, default=False),
    sa.Column("enqueued_at", TS),
    sa.Column("created_at", TS, nullable=False),
    sa.Column("started_at", TS),
    sa.Column("finished_at", TS),
    sa.Column("updated_at", TS, nullable=False),
    sa.Column("priority", sa.Integer, nullable=False, default=0, server_default="0"),  # higher runs first
    sa.Column("parent", sa.String(32)),  # the sweep a trial belongs to
    sa.Column("pending_reason", sa.Text),  # why a queued job is not running yet, when a worker knows
    sa.Index("ix_jobs_status_created", "status", "created_at"),
    sa.Index("ix_jobs_created", "created_at"),
    sa.Index("ix_jobs_parent", "parent"),
    sa.Index("ix_jobs_status_priority_created", "status", "priority", "created_at"),
)

job_events = sa.Table(
    "job_events", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("from_status", sa.String(16)),
    sa.Column("to_status", sa.String(16), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("at", TS, nullable=False),
)

datasets = sa.Table(
    "datasets", metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("classes", sa.JSON, nullable=False),
    sa.Column("counts", sa.JSON, nullable=False),
    sa.Column("num_images", sa.Integer, nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("created_at", TS, nullable=False),
)

model_versions = sa.Table(
    "model_versions", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("job_id", sa.String(32)),
    sa.Column("checkpoint", sa.String(64), nullable=False),
    sa.Column("card", sa.JSON, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("created_at", TS, nullable=False),
    sa.Column("gate", sa.JSON),  # the register gate (and the metrics it saw) that promoted this version
    sa.UniqueConstraint("name", "version", name="uq_model_versions_name_version"),
)

workers = sa.Table(  # what each worker advertises; refreshed by its heartbeat
    "workers", metadata,
    sa.Column("name", sa.String(255), primary_key=True),
    sa.Column("hostname", sa.String(255)),
    sa.Column("gpus", sa.Integer, nullable=False, default=0, server_default="0"),
    sa.Column("free_gpus", sa.Integer, nullable=False, default=0, server_default="0"),
    sa.Column("slots", sa.Integer, nullable=False, default=1, server_default="1"),
    sa.Column("info", sa.JSON),
    sa.Column("started_at", TS, nullable=False),
    sa.Column("heartbeat_at", TS, nullable=False),
)

idempotency_keys = sa.Table(  # Idempotency-Key replays, per caller and endpoint
    "idempotency_keys", metadata,
    sa.Column("principal", sa.String(64), primary_key=True),
    sa.Column("endpoint", sa.String(64), primary_key=True),
    sa.Column("key", sa.String(255), primary_key=True),
    sa.Column("body_sha256", sa.String(64), nullable=False),
    sa.Column("status_code", sa.Integer),
    sa.Column("response", sa.JSON),
    sa.Column("created_at", TS, nullable=False),
)

model_aliases = sa.Table(
    "model_aliases", metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("alias", sa.String(64), primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
)

tokens = sa.Table(
    "tokens", metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False, unique=True),
    sa.Column("scopes", sa.JSON, nullable=False),
    sa.Column("created_at", TS, nullable=False),
    sa.Column("revoked_at", TS),
    sa.Column("expires_at", TS),
    sa.Column("last_used_at", TS),
)

CONNECT_TIMEOUT_S = 3  # PostgreSQL: seconds to establish a connection (libpq connect_timeout)
POOL_TIMEOUT_S = 5  # seconds a request waits for a free pooled connection before it answers 503

_engines: dict[str, sa.Engine] = {}
_lock = threading.Lock()


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    # WAL lets the web read while a worker writes; busy_timeout waits for a writer instead of failing.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def create_engine(url: str) -> sa.Engine:
    """A new engine for ``url``; SQLite gets WAL + busy_timeout on every connection."""
    if url.startswith("sqlite"):
        path = sa.engine.make_url(url).database
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 30})
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # A database that is down answers within seconds (503 naming it), not after the OS's TCP
    # timeout (~2 minutes): libpq's connect_timeout, and a bounded wait for a pooled connection.
    connect_args = {}
    if url.startswith("postgresql") and "connect_timeout" not in sa.engine.make_url(url).query:
        connect_args["connect_timeout"] = CONNECT_TIMEOUT_S
    return sa.create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10, pool_timeout=POOL_TIMEOUT_S,
                            connect_args=connect_args)


def make_engine(settings) -> sa.Engine:
    """The process-wide engine for ``settings.db_url`` (one pool per URL per process)."""
    url = settings.db_url
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _engines[url] = create_engine(url)
        return engine


def after_fork() -> None:
    """Call in a forked child: drop inherited pooled connections without closing the parent's sockets."""
    with _lock:
        for engine in _engines.values():
            engine.dispose(close=False)


def dispose_all() -> None:
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()


def alembic_config(connection=None):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def migrate(settings, revision: str = "head") -> None:
    """Upgrade the store at ``settings.db_url`` to ``revision`` (idempotent)."""
    from alembic import command

    engine = make_engine(settings)
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), revision)


def current_revision(settings) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with make_engine(settings).connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def main(argv: list[str] | None = None) -> int:
    from configs import Settings

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["upgrade"]:
        print("usage: python -m worker.db upgrade [REVISION]", file=sys.stderr)
        return 2
    settings = Settings.from_env()
    migrate(settings, argv[1] if len(argv) > 1 else "head")
    print(f"job store at {sa.engine.make_url(settings.db_url).render_as_string(hide_password=True)} "
          f"is at revision {current_revision(settings)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
