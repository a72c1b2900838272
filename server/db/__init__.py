"""Persistence: SQLAlchemy 2 models and the engine (SQLite WAL by default, PostgreSQL by URL)."""

from server.db.session import Database, DatabaseError

__all__ = ["Database", "DatabaseError"]
