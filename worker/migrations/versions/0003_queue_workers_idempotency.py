"""jobs: priority, parent (a sweep's trials), pending_reason; workers (what each advertises);
idempotency_keys (POST replays); model_versions.gate (the gate that promoted a version)

Revision ID: 0003
Revises: 0002
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.add_column("jobs", sa.Column("priority", sa.Integer, nullable=False, server_default="0"))
    op.add_column("jobs", sa.Column("parent", sa.String(32)))
    op.add_column("jobs", sa.Column("pending_reason", sa.Text))
    op.create_index("ix_jobs_parent", "jobs", ["parent"])
    op.create_index("ix_jobs_status_priority_created", "jobs", ["status", "priority", "created_at"])
    op.create_table(
        "workers",
        sa.Column("name", sa.String(255), primary_key=True),
        sa.Column("hostname", sa.String(255)),
        sa.Column("gpus", sa.Integer, nullable=False, server_default="0"),
        sa.Column("free_gpus", sa.Integer, nullable=False, server_default="0"),
        sa.Column("slots", sa.Integer, nullable=False, server_default="1"),
        sa.Column("info", sa.JSON),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("heartbeat_at", TS, nullable=False),
    )
    op.create_table(
        "idempotency_keys",
        sa.Column("principal", sa.String(64), primary_key=True),
        sa.Column("endpoint", sa.String(64), primary_key=True),
        sa.Column("key", sa.String(255), primary_key=True),
        sa.Column("body_sha256", sa.String(64), nullable=False),
        sa.Column("status_code", sa.Integer),
        sa.Column("response", sa.JSON),
        sa.Column("created_at", TS, nullable=False),
    )
    op.add_column("model_versions", sa.Column("gate", sa.JSON))


def downgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.drop_column("gate")
    op.drop_table("idempotency_keys")
    op.drop_table("workers")
    op.drop_index("ix_jobs_status_priority_created", "jobs")
    op.drop_index("ix_jobs_parent", "jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("pending_reason")
        batch.drop_column("parent")
        batch.drop_column("priority")
