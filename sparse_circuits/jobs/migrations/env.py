"""Alembic environment: the service's tables (jobs/db.py), on SQLite or PostgreSQL.

Run through `sparse_circuits.jobs.migrations.migrate(url)` or `sparse-circuits db upgrade`;
`alembic -c sparse_circuits/jobs/alembic.ini revision --autogenerate -m ...` writes a new
revision against the URL in `-x url=...` (default: a SQLite file in the working directory).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from sparse_circuits.jobs.db import Base, make_engine

# one lock key for every migrating process on a PostgreSQL server (several replicas)
MIGRATION_LOCK_KEY = 0x5C1C_0001


def _url() -> str:
    return (
        context.config.attributes.get("url")
        or context.get_x_argument(as_dictionary=True).get("url")
        or context.config.get_main_option("sqlalchemy.url")
    )


def run_offline() -> None:
    context.configure(url=_url(), target_metadata=Base.metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    engine = make_engine(_url())
    try:
        with engine.connect() as connection:
            context.configure(
                connection=connection,
                target_metadata=Base.metadata,
                render_as_batch=connection.dialect.name == "sqlite",
            )
            with context.begin_transaction():
                if connection.dialect.name == "postgresql":
                    # two replicas upgrading at once: the second waits, then finds head
                    connection.execute(
                        text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK_KEY}
                    )
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
