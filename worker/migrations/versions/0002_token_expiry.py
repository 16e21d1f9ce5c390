"""tokens: expires_at (a token may expire) and last_used_at (written at most once a minute per token)

Revision ID: 0002
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.add_column("tokens", sa.Column("expires_at", TS))
    op.add_column("tokens", sa.Column("last_used_at", TS))


def downgrade() -> None:
    with op.batch_alter_table("tokens") as batch:
        batch.drop_column("last_used_at")
        batch.drop_column("expires_at")
