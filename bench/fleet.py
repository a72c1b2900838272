"""`facegate bench fleet`: a whole site fleet, end to end, through bridged brokers into the database.

What runs (see :mod:`bench.fleet_rig`, :mod:`bench.fleet_doors`): one central mosquitto, one mosquitto per
site bridged to it, the database (SQLite file or a throwaway PostgreSQL), ``servers`` server processes
per site on the central broker (a server serves one site; more than one share the site's ingest through
an MQTT v5 shared subscription), and ``devices`` simulated doors spread evenly over the site brokers,
``rate`` events/s each, each event kept until the server's receipt and sent again as the door does.
After ``duration`` seconds the doors stop making events and the bench waits (bounded) until every
event has its receipt and is in the database; then it counts, from the database.

The figures (``--json`` prints exactly these keys):

- ``events_sent``: distinct events the doors made; ``events_stored``: ``SELECT count(*)`` of the events
  table (a fresh database); ``lost``: sent event ids that no row carries (must be 0: exit 1 otherwise).
- ``duplicates``: publishes beyond one per stored event, i.e. every publish including the doors'
  re-sends, minus ``events_stored``. With ``lost == 0`` and a broker that drops nothing, each of them
  reached a server that found the event already on record and absorbed it (an MQTT-level redelivery
  after a reconnect is not counted; the servers' own counters are shown in the table as a cross-check).
- ``ingest_events_per_s``: ``events_stored`` over the ingest wall time, from the first event's ``ts``
  to the last row's ``received_at`` (database columns); it is bounded by the offered load
  (``devices x rate``), so raise ``--rate`` to look for the ceiling.
- ``p99_event_to_db_ms``: the 99th percentile of ``received_at - ts`` over the stored rows: ``ts`` is the
  wall clock when the door made (and first published) the event, ``received_at`` the server's wall clock
  when its writer took the event into the batch it then committed; same host, same clock. A re-sent
  event keeps its ``ts``, so its wait for the re-send counts.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from core.protocol.topics import Topics
from device.mqtt.outbox import CONFIRM_WAIT_S

DbKind = Literal["sqlite", "postgresql"]
KEYS = ("devices", "sites", "servers", "db", "events_sent", "events_stored", "duplicates", "lost",
        "ingest_events_per_s", "p99_event_to_db_ms")
EVENTS_PER_DOOR_S = 1.0  # a busy door: one decision a second, all day (far above a real entrance's load)
START_DELAY_S = 1.0  # the doors start together this long after they connected
# The final wait for receipts: a door re-sends after CONFIRM_WAIT_S, and once more after twice that.
DRAIN_TIMEOUT_S = 6 * CONFIRM_WAIT_S + 60.0
POLL_S = 0.25
PG_DURABLE = True  # measure PostgreSQL with fsync on, as deployed (SQLite runs WAL, synchronous=NORMAL)


class BenchError(Exception):
    """A part did not come up, a server died, or events were still missing at the end."""


@dataclass(frozen=True, slots=True)
class ReplicaFigures:
    """One server process's own counters (from its /metrics): what its writer inserted and absorbed."""

    name: str
    stored: int
    duplicates: int


@dataclass
class FleetResult:
    """The contract's figures plus what the table shows besides."""

    figures: dict[str, Any]
    replicas: list[ReplicaFigures] = field(default_factory=list)
    resent: int = 0
    publishes: int = 0
    duration_s: float = 0.0
    rate: float = EVENTS_PER_DOOR_S

    def to_json(self) -> dict[str, Any]:
        """Exactly the contract's keys."""
        return {key: self.figures[key] for key in KEYS}


@dataclass(frozen=True, slots=True)
class _Stored:
    ids: set[str]
    rows: int
    lags_ms: list[float]
    wall_s: float


def _read_database(url: str) -> _Stored:
    """Every stored event id, the per-row lag and the ingest wall time, by SELECT."""
    from sqlalchemy import select

    from server.db.models import EventRow
    from server.db.session import Database

    with Database(url) as db, db.session() as session:
        rows = session.execute(select(EventRow.event_id, EventRow.ts, EventRow.received_at)).all()
    if not rows:
        return _Stored(set(), 0, [], 0.0)

    def utc(value: dt.datetime) -> dt.datetime:  # SQLite hands back naive UTC, PostgreSQL aware
        return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)

    lags = sorted((utc(r[2]) - utc(r[1])).total_seconds() * 1000.0 for r in rows)
    wall = (max(utc(r[2]) for r in rows) - min(utc(r[1]) for r in rows)).total_seconds()
    return _Stored({str(r[0]) for r in rows}, len(rows), lags, wall)


def percentile(sorted_values: list[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of an ascending list; 0 when empty."""
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))]


@contextlib.contextmanager
def _database(kind: DbKind, workdir: Path) -> Iterator[str]:
    """Yield the database URL: a SQLite file, or a throwaway PostgreSQL cluster stopped afterwards."""
    if kind == "sqlite":
        yield f"sqlite:///{workdir / 'fleet.db'}"
        return
    from server.db.cluster import LocalPostgres, PostgresStartError, PostgresUnavailable

    try:
        cluster = LocalPostgres(durable=PG_DURABLE).start()
    except PostgresUnavailable as exc:
        raise BenchError(f"--db postgresql needs PostgreSQL here: {exc}") from exc
    except PostgresStartError as exc:
        raise BenchError(f"the throwaway PostgreSQL did not start: {exc}") from exc
    try:
        yield cluster.url
    finally:
        cluster.close()


def spread(devices: int, sites: list[str]) -> dict[str, list[str]]:
    """Door ids ``door-000…`` dealt round-robin over the sites (site sizes differ by at most one)."""
    width = max(3, len(str(devices - 1)))
    doors: dict[str, list[str]] = {site: [] for site in sites}
    for i in range(devices):
        doors[sites[i % len(sites)]].append(f"door-{i:0{width}d}")
    return doors


def run_fleet(devices: int, sites: int, duration: float, db: DbKind, servers: int,
              rate: float = EVENTS_PER_DOOR_S, on_progress: Callable[[str, float], None] | None = None,
              ) -> FleetResult:
    """Start everything, run the doors for ``duration`` seconds, wait for the receipts, count."""
    from bench.fleet_doors import DoorsError, SiteDoors
    from bench.fleet_rig import PREFIX, Brokers, RigError, ServerFleet, site_names

    if devices < sites:
        raise BenchError(f"--devices {devices} is fewer than --sites {sites}: every site needs a door")
    names = site_names(sites)
    progress = on_progress or (lambda _what, _done: None)
    with tempfile.TemporaryDirectory(prefix="facegate-bench-fleet-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        try:
            progress("database", 0.0)
            url = stack.enter_context(_database(db, workdir))  # first: a missing PostgreSQL fails fast
            progress("brokers", 0.0)
            brokers = stack.enter_context(Brokers(workdir, names))
            assert brokers.central is not None  # noqa: S101 - started above
            progress("servers", 0.0)
            fleet = ServerFleet(workdir, url, brokers.central.port, names, servers)
            stack.callback(fleet.close)
            fleet.start()
            start_at = time.monotonic() + START_DELAY_S
            doors = []
            for site, ids in spread(devices, names).items():
                broker = brokers.site[site]
                doors.append(SiteDoors(Topics(PREFIX, site), ids, broker.host, broker.port, rate, start_at,
                                       duration).start())
                stack.callback(doors[-1].close)
        except (RigError, DoorsError) as exc:
            raise BenchError(str(exc)) from exc
        while (now := time.monotonic()) < start_at + duration:
            progress("doors sending", max(0.0, now - start_at) / duration)
            if fleet.exited():
                raise BenchError(f"server {', '.join(fleet.exited())} exited during the run; logs under "
                                 f"{workdir / 'servers'}")
            time.sleep(POLL_S)
        for site_doors in doors:
            site_doors.stop_sending()
        sent = sum(len(d.counts().event_ids) for d in doors)
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while (pending := sum(d.counts().pending for d in doors)) > 0:
            progress("waiting for receipts", 1.0 - pending / max(1, sent))
            if time.monotonic() > deadline:
                break  # counted below: whatever is not in the database is reported as lost
            time.sleep(POLL_S)
        counts = [d.counts() for d in doors]
        replicas = [ReplicaFigures(r.name, *r.audit_counts()) for r in fleet.replicas]
        stored = _read_database(url)
    event_ids = [eid for c in counts for eid in c.event_ids]
    publishes = sum(c.publishes for c in counts)
    lost = len(set(event_ids) - stored.ids)
    figures = {
        "devices": devices, "sites": sites, "servers": servers, "db": db,
        "events_sent": len(event_ids), "events_stored": stored.rows,
        "duplicates": max(0, publishes - stored.rows), "lost": lost,
        "ingest_events_per_s": round(stored.rows / stored.wall_s, 1) if stored.wall_s > 0 else 0.0,
        "p99_event_to_db_ms": round(percentile(stored.lags_ms, 0.99), 1),
    }
    return FleetResult(figures, replicas, sum(c.resent for c in counts), publishes, duration, rate)


def render(result: FleetResult) -> Any:
    """A rich table of the run: the contract's figures, then each server process's own counters."""
    from rich.table import Table

    f = result.figures
    table = Table(title=f"fleet: {f['devices']} doors x {result.rate:g} events/s over {f['sites']} sites, "
                        f"{f['servers']} server(s) per site, {f['db']}, {result.duration_s:g} s")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key in KEYS[4:]:
        table.add_row(key, str(f[key]))
    table.add_row("publishes (incl. re-sends)", str(result.publishes))
    table.add_row("re-sent by the doors", str(result.resent))
    for replica in result.replicas:
        table.add_row(f"server {replica.name}: inserted / absorbed",
                      f"{replica.stored} / {replica.duplicates}")
    return table
