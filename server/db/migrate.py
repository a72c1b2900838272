"""Schema migrations: bring a database to this server's revision with Alembic, in-process, safely.

Life of a migration (``migrate``; ``Database.migrate``, every entry point and ``facegate server migrate``):

1. Take the migration lock, so that two replicas starting at once never both run a revision:
   PostgreSQL ``pg_advisory_xact_lock`` inside the migration's transaction (released by its commit or
   rollback, even when the process dies); SQLite an ``flock`` on ``<database file>.migrate-lock``
   (pysqlite runs DDL outside transactions, so SQLite's own locking would let two processes race
   between "no table yet" and ``CREATE TABLE``).
2. Read the database's revision (``alembic_version``). A revision this server does not know was written
   by a newer server: refuse (``SchemaTooNewError`` names both revisions) before writing anything.
3. No revision but facegate tables present: an install made by ``create_all`` before migrations existed.
   Each present table must have exactly the baseline's (0001) columns, or ``LegacySchemaError`` stops
   it, again before any write. Baseline tables it lacks (the model registry's, when only the CLI had
   opened it) are created as 0001 defines them; then it is stamped at 0001.
4. Upgrade to the target (``head`` by default); downgrades are refused.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import MetaData, inspect, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from server.db.models import Base
from server.db.session import DatabaseError

if TYPE_CHECKING:
    from server.db.session import Database

logger = logging.getLogger(__name__)

BASELINE_REVISION = "0001"
# Key of the PostgreSQL advisory lock every replica takes around a migration ("fgmi" in ASCII); any
# other application sharing the database must not use it.
MIGRATION_LOCK_KEY = 0x66676D69
SQLITE_LOCK_SUFFIX = ".migrate-lock"
# How long a start waits for another replica's migration (or, on PostgreSQL, for a table lock a running
# older server holds) before it gives up with an error, instead of hanging unseen; a supervisor restarts
# it. Long enough for an index build on a large events table.
LOCK_TIMEOUT_S = 600.0
LOCK_POLL_S = 0.2
LOCK_NOT_AVAILABLE = "55P03"  # PostgreSQL's SQLSTATE when lock_timeout expires


class MigrationLockTimeoutError(Exception):
    """Another process held the migration lock (or a table lock) for longer than the timeout."""


class MigrationError(DatabaseError):
    """The database cannot be migrated (bad target, failed revision)."""


class SchemaTooNewError(MigrationError):
    """The database is at a revision this server does not know: a newer server migrated it."""


class LegacySchemaError(MigrationError):
    """A pre-migration database whose tables differ from the baseline: it is not stamped or changed."""


@dataclass(frozen=True, slots=True)
class MigrationReport:
    """What one ``migrate`` call found and did."""

    database: str  # URL, password hidden
    dialect: str
    from_revision: str | None
    to_revision: str
    head: str
    applied: tuple[str, ...]  # revisions run, oldest first (empty: already there)
    legacy_stamped: bool  # a create_all-made database was recognised and stamped at the baseline

    def to_json(self) -> dict[str, Any]:
        """The ``facegate server migrate --json`` object."""
        out = asdict(self)
        out["applied"] = list(self.applied)
        return out


def schema_metadata() -> MetaData:
    """Every facegate table: the server's models plus the model registry's (which live in their module)."""
    import server.registry.registry  # noqa: F401 - defines model_versions and model_registry_events on Base

    return Base.metadata


def alembic_config(connection: Connection | None = None) -> Config:
    """An in-memory Alembic config on the shipped ``server/db/migrations`` (no alembic.ini)."""
    from server.db.migrations import MIGRATIONS_DIR

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def script_directory() -> ScriptDirectory:
    """The revisions this server ships."""
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    """The newest revision this server knows."""
    head = script_directory().get_current_head()
    if head is None:  # pragma: no cover - the package always ships revisions
        raise MigrationError("no migration revisions are installed (server/db/migrations/versions)")
    return head


def current_revision(db: Database) -> str | None:
    """The database's revision (None: never migrated); reads only."""
    try:
        with db.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    except SQLAlchemyError as exc:
        raise MigrationError(f"cannot read the schema revision: {exc}") from exc


def _known(script: ScriptDirectory, revision: str) -> bool:
    try:
        return script.get_revision(revision) is not None
    except CommandError:
        return False


def _require_known(script: ScriptDirectory, current: str | None, head: str) -> None:
    if current is not None and not _known(script, current):
        raise SchemaTooNewError(
            f"the database schema is at revision {current!r}, which this server does not know (its newest "
            f"is {head!r}): a newer facegate server migrated it. Run that version, or restore the backup "
            "taken before its upgrade; nothing was changed")


def _path(script: ScriptDirectory, current: str | None, target: str) -> tuple[str, ...]:
    """Revisions from ``current`` (exclusive) up to ``target`` (inclusive), oldest first."""
    if current == target:
        return ()
    if current is not None and target in {r.revision for r in script.iterate_revisions(current, "base")}:
        raise MigrationError(f"the database is at revision {current!r}, past {target!r}: "
                             "`facegate server migrate` only upgrades")
    revisions = script.iterate_revisions(target, current or "base")
    return tuple(reversed([r.revision for r in revisions]))


def _check_legacy(conn: Connection, baseline: MetaData, present: set[str]) -> list[str]:
    """Compare a create_all-made database's tables with the baseline; return the baseline tables it lacks."""
    inspector = inspect(conn)
    problems = []
    for name, table in baseline.tables.items():
        if name not in present:
            continue
        have = {c["name"] for c in inspector.get_columns(name)}
        want = {c.name for c in table.columns}
        if have != want:
            problems.append(f"{name} (missing {sorted(want - have)}, unexpected {sorted(have - want)})")
    if problems:
        raise LegacySchemaError(
            "the database has facegate tables but no migration revision, and they differ from the baseline "
            f"schema ({BASELINE_REVISION}): {'; '.join(problems)}. It was not made by a facegate server "
            "this one can upgrade; nothing was changed")
    return [name for name in baseline.tables if name not in present]


def baseline_metadata() -> MetaData:
    """The frozen tables of the baseline revision (0001), as its module defines them."""
    module = script_directory().get_revision(BASELINE_REVISION)
    if module is None:  # pragma: no cover - shipped with the package
        raise MigrationError(f"baseline revision {BASELINE_REVISION} is not installed")
    meta: MetaData = module.module.baseline_metadata()
    return meta


@contextlib.contextmanager
def _sqlite_file_lock(database: str | None, timeout_s: float) -> Iterator[None]:
    """An exclusive flock beside the SQLite file (nothing for an in-memory database)."""
    if not database or database == ":memory:":
        yield
        return
    import fcntl

    lock_path = Path(database).with_name(Path(database).name + SQLITE_LOCK_SUFFIX)
    deadline = time.monotonic() + timeout_s
    with lock_path.open("a") as handle:
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise MigrationLockTimeoutError(f"{lock_path} is held by another migration") from None
                time.sleep(LOCK_POLL_S)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def migrate(db: Database, revision: str = "head", lock_timeout_s: float = LOCK_TIMEOUT_S) -> MigrationReport:
    """Upgrade ``db`` to ``revision`` under the migration lock (see the module docstring); give up with a
    MigrationError after waiting ``lock_timeout_s`` for a lock."""
    script = script_directory()
    head = head_revision()
    target = head if revision == "head" else revision
    if not _known(script, target):
        raise MigrationError(f"unknown target revision {revision!r} (this server knows up to {head!r})")
    url = make_url(db.url)
    lock = _sqlite_file_lock(url.database, lock_timeout_s) if db.is_sqlite else contextlib.nullcontext()
    try:
        with lock, db.engine.connect() as conn:
            with conn.begin():
                if not db.is_sqlite:  # lock_timeout covers the advisory lock and the DDL's table locks
                    conn.execute(text(f"SET LOCAL lock_timeout = {max(1, int(lock_timeout_s * 1000))}"))
                    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
                current = MigrationContext.configure(conn).get_current_revision()
                _require_known(script, current, head)
                pending = _path(script, current, target)
                legacy = False
                present = set(inspect(conn).get_table_names())
                baseline = baseline_metadata()
                if current is None and present & set(baseline.tables):
                    missing = _check_legacy(conn, baseline, present)
                    if missing:
                        baseline.create_all(conn, tables=[baseline.tables[name] for name in missing])
                    command.stamp(alembic_config(conn), BASELINE_REVISION)
                    legacy, current = True, BASELINE_REVISION
                    pending = _path(script, current, target)
                    logger.warning("database made before migrations: recognised, stamped at %s "
                                   "(created %d missing baseline table(s))", BASELINE_REVISION, len(missing))
                if pending:
                    logger.info("migrating the database %s -> %s (%s)", current or "empty", target,
                                ", ".join(pending))
                    command.upgrade(alembic_config(conn), target)
                done = MigrationContext.configure(conn).get_current_revision()
    except MigrationLockTimeoutError as exc:
        raise MigrationError(f"gave up after {lock_timeout_s:.0f} s waiting for the migration lock: {exc} "
                             "(another replica is migrating; start again when it is done)") from exc
    except OperationalError as exc:
        if getattr(exc.orig, "sqlstate", None) == LOCK_NOT_AVAILABLE:
            raise MigrationError(f"gave up after {lock_timeout_s:.0f} s waiting for a lock (another replica "
                                 "migrating, or a running older server holding a table): start again when "
                                 "it is done") from exc
        raise MigrationError(f"migration to {target!r} failed: {exc}") from exc
    except (SQLAlchemyError, CommandError) as exc:
        raise MigrationError(f"migration to {target!r} failed: {exc}") from exc
    if done != target:  # pragma: no cover - alembic reported success
        raise MigrationError(f"migration ended at {done!r}, not {target!r}")
    return MigrationReport(database=url.render_as_string(hide_password=True), dialect=db.dialect,
                           from_revision=None if legacy else current, to_revision=target, head=head,
                           applied=pending, legacy_stamped=legacy)
