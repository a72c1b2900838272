"""Persistence: SQLAlchemy 2 models, the engine (SQLite WAL, or PostgreSQL by URL), Alembic migrations."""

from server.db.session import Database, DatabaseError

__all__ = ["Database", "DatabaseError"]
