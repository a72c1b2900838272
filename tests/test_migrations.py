"""Schema migrations on both engines (``db_url``: a SQLite file and a fresh database in the run's throwaway
PostgreSQL): upgrade with rows kept, the pre-migration (create_all) install, the refusal of a newer
database, ``facegate server migrate --json``, two replicas starting at once, and models == migrations."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from click.testing import CliRunner
from sqlalchemy import MetaData, func, insert, inspect, select, text
from sqlalchemy.engine import make_url

from facegate.cli import main as facegate_cli
from server.db.migrate import (
    BASELINE_REVISION,
    MIGRATION_LOCK_KEY,
    SQLITE_LOCK_SUFFIX,
    LegacySchemaError,
    MigrationError,
    SchemaTooNewError,
    baseline_metadata,
    current_revision,
    head_revision,
    migrate,
    schema_metadata,
)
from server.db.models import DeletionDevice, DeletionRequest, EventRow, Person, User
from server.db.session import Database
from tests.conftest import REPO
from tests.server_support import make_config

NOW = dt.datetime(2026, 12, 1, 12, 0, 0)  # naive UTC, as the baseline stores times
FUTURE_REVISION = "9999_from_a_newer_server"
NEW_INDEXES = {("events", "ix_events_kind_ts"), ("deletion_devices", "ix_deletion_devices_device_id")}


def _indexes(db: Database, table: str) -> set[str]:
    return {str(i["name"]) for i in inspect(db.engine).get_indexes(table)}


def _fill_baseline(db: Database, meta: MetaData) -> None:
    """Rows in the 0001 tables, written through the frozen baseline tables (not today's models)."""
    t = meta.tables
    with db.engine.begin() as conn:
        conn.execute(insert(t["persons"]), [{"id": "p" * 32, "name": "Ada", "external_id": "E-1",
                                             "consent": True, "consent_at": NOW, "created_by": "admin",
                                             "created_at": NOW, "updated_at": NOW}])
        conn.execute(insert(t["users"]), [{"username": "admin", "password_hash": "x", "role": "admin",
                                           "disabled": False, "created_at": NOW}])
        conn.execute(insert(t["events"]), [
            {"event_id": f"e{i}", "device_id": "door-1", "kind": "denied" if i % 2 else "granted",
             "person_id": None, "person_name": None, "score": 0.5, "margin": 0.1, "liveness": "pass",
             "ts": NOW + dt.timedelta(seconds=i), "received_at": NOW, "payload": {"seq": i}}
            for i in range(6)])
        conn.execute(insert(t["deletion_requests"]), [{"id": "d" * 32, "person_id": "q" * 32,
                                                       "requested_by": "admin", "requested_at": NOW,
                                                       "template_ids": ["t1"], "delta_sequence": 3,
                                                       "status": "pending", "detail": ""}])
        conn.execute(insert(t["deletion_devices"]), [{"request_id": "d" * 32, "device_id": "door-1",
                                                      "state": "pending", "detail": ""}])


def _assert_rows_kept(db: Database) -> None:
    """The baseline rows read back through today's models, values intact."""
    with db.session() as session:
        person = session.get(Person, "p" * 32)
        assert person is not None and person.name == "Ada" and person.consent_at == NOW.replace(tzinfo=dt.UTC)
        assert session.scalar(select(User.role).where(User.username == "admin")) == "admin"
        denied = session.scalars(select(EventRow).where(EventRow.kind == "denied")
                                 .order_by(EventRow.ts.desc())).all()
        assert [e.event_id for e in denied] == ["e5", "e3", "e1"]
        assert denied[0].payload == {"seq": 5}
        request = session.get(DeletionRequest, "d" * 32)
        assert request is not None and request.template_ids == ["t1"]
        assert [d.device_id for d in request.devices] == ["door-1"]
        assert session.scalar(select(func.count()).select_from(DeletionDevice)) == 1


def _assert_head_schema(db: Database) -> None:
    for table, index in NEW_INDEXES:
        assert index in _indexes(db, table), f"{index} missing on {table}"
    assert "ix_events_kind" not in _indexes(db, "events")  # 0002 replaced it with ix_events_kind_ts


def _schema_diff(db: Database) -> list[Any]:
    with db.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(context, schema_metadata()))


def _snapshot(db: Database) -> dict[str, Any]:
    """Tables, their indexes and row counts: what a refused migration must leave as it was."""
    inspector = inspect(db.engine)
    out: dict[str, Any] = {}
    with db.engine.connect() as conn:
        for name in sorted(inspector.get_table_names()):
            count = conn.scalar(text(f'SELECT count(*) FROM "{name}"'))  # noqa: S608 - names from the catalog
            out[name] = (count, sorted(str(i["name"]) for i in inspector.get_indexes(name)))
        if "alembic_version" in out:
            out["revision"] = conn.scalar(text("SELECT version_num FROM alembic_version"))
    return out


def test_migration_models_equal_migrated_schema(db_url: str) -> None:
    """A fresh database migrated to head has exactly the models' schema (a table change without a
    revision fails here); migrating again applies nothing."""
    with Database(db_url) as db:
        report = db.migrate()
        assert report.applied == ("0001", "0002") and report.from_revision is None
        assert report.to_revision == head_revision() == current_revision(db)
        assert _schema_diff(db) == []
        _assert_head_schema(db)
        assert db.migrate().applied == ()


def test_migration_upgrade_keeps_rows(db_url: str) -> None:
    """A database made at 0001, with rows, upgrades to head: the rows are kept and 0002's indexes exist."""
    with Database(db_url) as db:
        assert db.migrate(BASELINE_REVISION).applied == ("0001",)
        assert "ix_events_kind" in _indexes(db, "events")
        assert not NEW_INDEXES & {(t, i) for t, _ in NEW_INDEXES for i in _indexes(db, t)}
        _fill_baseline(db, baseline_metadata())
        report = db.migrate()
        assert report.from_revision == BASELINE_REVISION and report.applied == ("0002",)
        _assert_rows_kept(db)
        _assert_head_schema(db)
        assert _schema_diff(db) == []


def test_migration_legacy_create_all_database(db_url: str) -> None:
    """An install made by the old ``create_all`` (no alembic_version; here without the registry tables,
    as when only the CLI had opened it) is checked, completed, stamped at 0001 and upgraded."""
    meta = baseline_metadata()
    registry_tables = {"model_versions", "model_registry_events"}
    with Database(db_url) as db:
        meta.create_all(db.engine, tables=[t for n, t in meta.tables.items() if n not in registry_tables])
        _fill_baseline(db, meta)
        assert current_revision(db) is None
        report = db.migrate()
        assert report.legacy_stamped and report.from_revision is None and report.applied == ("0002",)
        assert current_revision(db) == head_revision()
        assert registry_tables <= set(inspect(db.engine).get_table_names())
        _assert_rows_kept(db)
        _assert_head_schema(db)
        assert _schema_diff(db) == []


def test_migration_legacy_mismatch_refused(db_url: str) -> None:
    """A pre-migration database whose tables differ from the baseline is refused, and nothing is written."""
    meta = baseline_metadata()
    with Database(db_url) as db:
        meta.create_all(db.engine, tables=[meta.tables["persons"], meta.tables["events"]])
        with db.engine.begin() as conn:
            conn.execute(text("ALTER TABLE events DROP COLUMN margin"))
        before = _snapshot(db)
        with pytest.raises(LegacySchemaError, match=r"events \(missing \['margin'\]"):
            db.migrate()
        assert _snapshot(db) == before
        assert "alembic_version" not in before


def _write_config(tmp_path: Path, db_url: str) -> Path:
    path = tmp_path / "server.toml"
    path.write_text(f'data_dir = "{tmp_path / "server"}"\n\n[database]\nurl = "{db_url}"\n')
    return path


def _migrate_cli(config: Path, *args: str) -> Any:
    return CliRunner().invoke(facegate_cli, ["server", "migrate", "--config", str(config), *args])


def test_migration_cli_json(db_url: str, tmp_path: Path) -> None:
    """``facegate server migrate --json``: one JSON object with the exact keys; --revision; idempotent."""
    config = _write_config(tmp_path, db_url)
    first = _migrate_cli(config, "--revision", BASELINE_REVISION, "--json")
    assert first.exit_code == 0, first.output
    out = json.loads(first.stdout)
    assert set(out) == {"database", "dialect", "from_revision", "to_revision", "head", "applied",
                        "legacy_stamped"}
    assert out["dialect"] == db_url.split(":")[0].split("+")[0]
    assert (out["from_revision"], out["to_revision"], out["applied"]) == (None, "0001", ["0001"])
    second = json.loads(_migrate_cli(config, "--json").stdout)
    assert (second["from_revision"], second["to_revision"], second["applied"]) == ("0001", "0002", ["0002"])
    assert second["head"] == "0002" and second["legacy_stamped"] is False
    third = json.loads(_migrate_cli(config, "--json").stdout)
    assert third["applied"] == [] and third["from_revision"] == "0002"
    back = _migrate_cli(config, "--revision", BASELINE_REVISION)
    assert back.exit_code != 0 and "only upgrades" in back.output


def test_migration_refuses_newer_database(db_url: str, tmp_path: Path) -> None:
    """A database at a revision this server does not know: the CLI and the server refuse, naming both
    revisions, with a non-zero exit and no write (not even the bootstrap admin)."""
    with Database(db_url) as db:
        db.migrate()
        with db.engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = :v"), {"v": FUTURE_REVISION})
        before = _snapshot(db)
        config_path = _write_config(tmp_path, db_url)
        result = _migrate_cli(config_path, "--json")
        assert result.exit_code != 0
        assert FUTURE_REVISION in result.output and "'0002'" in result.output
        from server.app import create_app

        with pytest.raises(SchemaTooNewError, match=FUTURE_REVISION):
            create_app(make_config(tmp_path, database={"url": db_url}), start_mqtt=False)
        run = CliRunner().invoke(facegate_cli, ["server", "run", "--config", str(config_path)])
        assert run.exit_code != 0 and FUTURE_REVISION in run.output
        assert _snapshot(db) == before
        assert before["users"][0] == 0


REPLICA = textwrap.dedent("""
    import json, os, sys, time
    from server.db.session import Database
    go = sys.argv[2]
    open(go + f".ready-{os.getpid()}", "w").close()
    while not os.path.exists(go):
        time.sleep(0.005)
    with Database(sys.argv[1]) as db:
        print(json.dumps(db.migrate().to_json()))
""")


def test_migration_two_replicas_start_at_once(db_url: str, tmp_path: Path) -> None:
    """Two server processes migrating one database at the same moment: one runs the revisions, the other
    waits on the migration lock and finds nothing to do; neither fails."""
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", REPLICA, db_url, str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    deadline = time.monotonic() + 120  # a hang guard, not a performance figure
    while len(list(tmp_path.glob("go.ready-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()  # both have imported everything: they race from here
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    applied = sorted(tuple(json.loads(out)["applied"]) for out, _ in outs)
    assert applied == [(), ("0001", "0002")]
    with Database(db_url) as db:
        assert current_revision(db) == head_revision() and _schema_diff(db) == []


def test_migration_lock_held_too_long_gives_up_with_a_clear_error(db_url: str) -> None:
    """A replica whose migration lock stays taken (another one migrating, or stuck) stops waiting after
    the timeout with an error saying so, instead of hanging unseen; once the lock is free it migrates."""
    import fcntl

    with Database(db_url) as db:
        if db.is_sqlite:
            database = make_url(db_url).database
            assert database is not None
            holder: Any = Path(database + SQLITE_LOCK_SUFFIX).open("a")
            fcntl.flock(holder.fileno(), fcntl.LOCK_EX)
        else:
            holder = db.engine.connect()
            holder.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        try:
            started = time.monotonic()
            with pytest.raises(MigrationError, match="gave up after 1 s waiting for"):
                migrate(db, lock_timeout_s=1.0)
            assert time.monotonic() - started < 30  # it gave up: a hang guard, not a timing figure
            assert current_revision(db) is None  # nothing was written
        finally:
            if db.is_sqlite:
                holder.close()  # closing the file releases the flock
            else:
                holder.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY})
                holder.close()
        assert migrate(db, lock_timeout_s=1.0).to_revision == head_revision()


def _plan(db: Database, statement: Any) -> str:
    sql = str(statement.compile(dialect=db.engine.dialect, compile_kwargs={"literal_binds": True}))
    with db.engine.begin() as conn:
        if db.is_sqlite:
            return " ".join(str(row[-1]) for row in conn.execute(text(f"EXPLAIN QUERY PLAN {sql}")))
        # A handful of rows makes a sequential scan cheapest; ask whether the index can serve at all.
        conn.execute(text("SET LOCAL enable_seqscan = off"))
        return " ".join(str(row[0]) for row in conn.execute(text(f"EXPLAIN {sql}")))


def test_migration_0002_indexes_serve_their_queries(db_url: str) -> None:
    """0002 is a real change: the event list by kind and the per-device deletion lookup, as the server
    builds them, are planned on the new indexes on both engines."""
    from server.api.events import event_query

    with Database(db_url) as db:
        db.migrate()
        by_kind = event_query(None, None, "denied", None, None).order_by(EventRow.ts.desc(),
                                                                        EventRow.id.desc()).limit(50)
        assert "ix_events_kind_ts" in _plan(db, by_kind)
        waiting = select(DeletionDevice.request_id).where(DeletionDevice.device_id.in_(["door-1", "door-2"]))
        assert "ix_deletion_devices_device_id" in _plan(db, waiting)
