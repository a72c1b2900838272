"""`facegate bench fleet`, run small: bridged site brokers, server processes, the database, the doors.

Real mosquitto (the bridge needs it: amqtt cannot bridge, so these skip without it, as tests/test_bridge.py
does), real server processes, SQLite and a throwaway PostgreSQL (skipped with the reason when its binaries
are missing). Each run must store every event exactly once; with two servers per site both must store
some (each process's own counter, from its /metrics: the database does not say which process wrote a row).
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from bench.cli import cli
from bench.fleet import KEYS, percentile, run_fleet, spread
from server.broker import mosquitto_binary
from server.db.cluster import unavailable_reason as pg_unavailable_reason

needs_mosquitto = pytest.mark.skipif(
    mosquitto_binary() is None,
    reason="a bridge needs mosquitto (amqtt cannot bridge): apt install mosquitto; put /usr/sbin on PATH")
needs_postgres = pytest.mark.skipif(pg_unavailable_reason() is not None,
                                    reason=str(pg_unavailable_reason()))

DEVICES, SITES, DURATION = 6, 2, 4  # 3 doors per site, 1 event/s each: 24 events


@needs_mosquitto
def test_fleet_sqlite_one_server_stores_every_event_once() -> None:
    """The command's JSON has exactly the contract's keys; nothing is lost, nothing stored twice."""
    args = ["--devices", str(DEVICES), "--sites", str(SITES), "--duration", str(DURATION), "--db", "sqlite",
            "--servers", "1", "--json"]
    result = CliRunner().invoke(cli, ["fleet", *args])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert tuple(figures) == KEYS
    assert (figures["devices"], figures["sites"], figures["servers"], figures["db"]) == (DEVICES, SITES, 1,
                                                                                          "sqlite")
    assert figures["events_sent"] == DEVICES * DURATION
    assert figures["lost"] == 0
    assert figures["events_stored"] == figures["events_sent"]
    assert figures["duplicates"] >= 0 and figures["p99_event_to_db_ms"] > 0
    assert figures["ingest_events_per_s"] > 0


@needs_mosquitto
@needs_postgres
def test_fleet_postgresql_two_servers_share_the_ingest() -> None:
    """Two replicas per site on PostgreSQL: every event once, and each replica stored some of them."""
    result = run_fleet(DEVICES, SITES, DURATION, "postgresql", 2)
    figures = result.to_json()
    assert tuple(figures) == KEYS
    assert figures["servers"] == 2 and figures["db"] == "postgresql"
    assert figures["events_sent"] == DEVICES * DURATION
    assert figures["lost"] == 0
    assert figures["events_stored"] == figures["events_sent"]
    assert len(result.replicas) == SITES * 2
    assert all(r.stored > 0 for r in result.replicas), result.replicas
    assert sum(r.stored for r in result.replicas) == figures["events_stored"]


def test_fleet_without_postgresql_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """--db postgresql where no PostgreSQL binaries are found: a clear error, nothing started."""
    monkeypatch.setenv("FACEGATE_PG_BINDIR", "/nonexistent/postgresql/bin")
    result = CliRunner().invoke(cli, ["fleet", "--devices", "2", "--duration", "1", "--db", "postgresql"])
    assert result.exit_code == 1
    assert "--db postgresql needs PostgreSQL here" in result.output


def test_doors_are_spread_evenly_and_percentiles_are_nearest_rank() -> None:
    """Door ids are dealt round-robin over the sites; the p99 of a short list is its top value."""
    doors = spread(7, ["a", "b"])
    assert doors == {"a": ["door-000", "door-002", "door-004", "door-006"], "b": ["door-001", "door-003",
                                                                                  "door-005"]}
    assert percentile([1.0, 2.0, 3.0], 0.99) == 3.0 and percentile([], 0.99) == 0.0
