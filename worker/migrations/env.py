"""Alembic environment: run with the connection ``worker.db.migrate`` hands over (no alembic.ini)."""
from alembic import context

from worker.db import create_engine, metadata

connection = context.config.attributes.get("connection")
if connection is None:  # `alembic` CLI use: the URL comes from the config's sqlalchemy.url
    engine = create_engine(context.config.get_main_option("sqlalchemy.url"))
    with engine.begin() as connection:
        context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
else:
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
