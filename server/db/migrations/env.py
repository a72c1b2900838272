"""Alembic environment: runs on the connection ``server.db.migrate`` hands over (online mode only).

``config.attributes["connection"]`` is an open SQLAlchemy connection, already holding the migration lock;
the target metadata is every facegate table (``server.db.migrate.schema_metadata``), so alembic's
``compare_metadata`` sees the same tables the server uses.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from server.db.migrate import MigrationError, schema_metadata

config = context.config


def run_online(connection: Connection) -> None:
    """Run the pending revisions in one transaction (PostgreSQL's DDL is transactional)."""
    context.configure(
        connection=connection,
        target_metadata=schema_metadata(),
        # SQLite cannot ALTER most things in place: batch mode copies the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise MigrationError("offline (SQL script) migrations are not supported; run `facegate server migrate`")
connection = config.attributes.get("connection")
if not isinstance(connection, Connection):
    raise MigrationError("run migrations through `facegate server migrate` (server.db.migrate), "
                         "which hands alembic its connection")
run_online(connection)
