"""Alembic migrations of the server database: ``env.py`` and ``versions/`` (revision 0001 is the baseline).

Shipped as package data and run programmatically by ``server.db.migrate`` (no alembic.ini at run time).
A developer adds a revision with ``alembic -c /dev/null revision`` pointed at this folder, or by copying
the newest file in ``versions/``; ``tests/test_migrations.py`` fails while the models and the migrated
schema differ.
"""

from pathlib import Path

MIGRATIONS_DIR = Path(__file__).resolve().parent

__all__ = ["MIGRATIONS_DIR"]
