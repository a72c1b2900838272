"""Engine and sessions: SQLite in WAL mode by default (pragmas on every connection), PostgreSQL by URL."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

if TYPE_CHECKING:
    from server.db.migrate import MigrationReport

logger = logging.getLogger(__name__)

SQLITE_CACHE_KIB = 16_384  # page cache per connection; the event table is the hot one


class DatabaseError(Exception):
    """The database cannot be opened or its schema cannot be migrated."""


def _sqlite_pragmas(busy_timeout_ms: int) -> Any:
    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        cursor = dbapi_conn.cursor()
        try:
            # WAL: readers never block the audit writer; NORMAL is durable across app crashes in WAL mode.
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            cursor.execute(f"PRAGMA cache_size=-{SQLITE_CACHE_KIB}")
            # Deleted chips and embeddings are overwritten with zeros, not left in free pages (erasure).
            cursor.execute("PRAGMA secure_delete=ON")
        finally:
            cursor.close()

    return on_connect


class Database:
    """An engine plus a session factory; ``close()`` is idempotent."""

    def __init__(self, url: str, echo: bool = False, busy_timeout_ms: int = 5000) -> None:
        parsed = make_url(url)
        self.url = url
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        connect_args: dict[str, Any] = {}
        if self.is_sqlite:
            connect_args["check_same_thread"] = False
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.engine: Engine = create_engine(
                url, echo=echo, connect_args=connect_args, pool_pre_ping=not self.is_sqlite
            )
        except (SQLAlchemyError, ImportError) as exc:
            where = parsed.render_as_string(hide_password=True)
            raise DatabaseError(f"cannot open database {where}: {exc}") from exc
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas(busy_timeout_ms))
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._closed = False

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self.engine.dialect.name

    def migrate(self, revision: str = "head") -> MigrationReport:
        """Bring the schema to ``revision`` (Alembic; refuses a database newer than this server)."""
        alembic_logger = logging.getLogger("alembic")
        if alembic_logger.level == logging.NOTSET:
            # Alembic's INFO lines (plugins at import, "Context impl", each revision) repeat at every
            # start; server.db.migrate logs what runs. A level set for "alembic" elsewhere is kept.
            alembic_logger.setLevel(logging.WARNING)
        from server.db.migrate import migrate

        return migrate(self, revision)

    def ping(self) -> bool:
        """True when the database answers a trivial query (health checks)."""
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except SQLAlchemyError as exc:
            logger.warning("database ping failed: %s", type(exc).__name__)
            return False
        return True

    def session(self) -> Session:
        """A new ORM session (caller closes it, or use :meth:`transaction`)."""
        return self._sessions()

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on error."""
        with self._sessions() as session, session.begin():
            yield session

    def close(self) -> None:
        """Dispose of the connection pool (safe to call twice)."""
        if not self._closed:
            self._closed = True
            self.engine.dispose()

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
