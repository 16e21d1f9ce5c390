"""Alembic migrations of the job store (frozen snapshots: they never import the live tables)."""
