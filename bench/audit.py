"""`facegate bench audit`: the audit subscriber under fleet load through a real broker.

1. Sustained: ``devices`` simulated doors publish ``rate`` events/s each (QoS 1, every 50th sent twice as
   after a lost PUBACK) for ``duration`` seconds; the database must hold every event exactly once.
   Reports publish->commit lag percentiles.
2. Capacity: a backlog of ``backlog`` events queued at the broker while the server is down is drained
   by the batched writer and by the baseline, a writer that commits every message on its own; the
   ratio batched/baseline and the headroom over the offered load are printed.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import Progress

from core.mqtt.client import ClientSettings, MqttClient
from core.protocol.schemas import EventPayload, LivenessPayload, utcnow
from core.protocol.topics import Topics
from core.types import DecisionKind, LivenessVerdict

PREFIX, SITE = "facegate", "bench"
DUPLICATE_EVERY = 50  # a door re-sends an event after a lost PUBACK; this simulates 2% of them
FLUSH_EVERY = 200  # wait for PUBACKs every this many publishes so a device never floods its queue
CONNECT_TIMEOUT_S = 10.0
DRAIN_DEADLINE_S = 1800.0  # gives up (and reports) instead of hanging if the writer stalls
POLL_S = 0.2
BATCH_MAX, LINGER_S = 500, 0.02  # the server's defaults (server.audit.subscriber)
KINDS = (DecisionKind.GRANTED, DecisionKind.GRANTED, DecisionKind.UNKNOWN, DecisionKind.DENIED)


class BenchError(Exception):
    """The broker or the subscriber did not come up, or events went missing."""


@dataclass
class _Writer:
    """A database, a subscriber and its MQTT source."""

    db: Any
    subscriber: Any
    source: Any

    def count(self) -> int:
        from sqlalchemy import func, select

        from server.db.models import EventRow

        with self.db.session() as session:
            return int(session.scalar(select(func.count()).select_from(EventRow)) or 0)

    def close(self) -> None:
        self.source.close()
        self.subscriber.close()
        self.db.close()


def _writer(path: Path, host: str, port: int, client_id: str, batch_max: int, linger_s: float) -> _Writer:
    from server.audit.subscriber import AuditSubscriber
    from server.audit.transport import ManualAckSource
    from server.config import MqttConfig
    from server.db.session import Database

    db = Database(f"sqlite:///{path}")
    db.migrate()
    subscriber = AuditSubscriber(db, Topics(PREFIX, SITE), batch_max=batch_max, linger_s=linger_s).start()
    config = MqttConfig(host=host, port=port, prefix=PREFIX, site=SITE, client_id=client_id)
    source = ManualAckSource(config, subscriber.filters, subscriber.handle).start()
    if not source.wait_connected(CONNECT_TIMEOUT_S):
        source.close()
        subscriber.close()
        raise BenchError(f"audit subscriber could not connect to {host}:{port}")
    return _Writer(db, subscriber, source)


def _event(device: str, seq: int) -> EventPayload:
    return EventPayload(event_id=uuid.uuid4(), seq=seq, ts=utcnow(), device=device, decision=KINDS[seq % 4],
                        person_id=f"p{seq % 50}", name=None, score=0.7, margin=0.1,
                        liveness=LivenessPayload(verdict=LivenessVerdict.SKIPPED))


def _door(host: str, port: int, device: str, topics: Topics, start: float, rate: float, count: int,
          sent: list[str], errors: list[str], progress: list[int]) -> None:
    client_id = f"bench-{device}-{uuid.uuid4().hex[:6]}"
    client = MqttClient(ClientSettings(host=host, port=port, client_id=client_id))
    client.start()
    try:
        if not client.wait_connected(CONNECT_TIMEOUT_S):
            errors.append(f"{device}: no broker")
            return
        handles = []
        for seq in range(count):
            if rate > 0:
                delay = start + seq / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            event = _event(device, seq)
            payload = event.to_bytes()
            handles.append(client.publish(topics.events(device), payload, qos=1))
            if seq % DUPLICATE_EVERY == 0:
                handles.append(client.publish(topics.events(device), payload, qos=1))
            sent.append(str(event.event_id))
            progress[0] += 1
            if len(handles) >= FLUSH_EVERY:
                if not all(h.wait_for_publish(60) for h in handles):
                    errors.append(f"{device}: a publish was not acknowledged")
                handles = []
        if not all(h.wait_for_publish(60) for h in handles):
            errors.append(f"{device}: a publish was not acknowledged")
    finally:
        client.close()


def _publish(host: str, port: int, devices: int, rate: float, count: int, label: str) -> list[str]:
    """Run ``devices`` publisher threads (``rate`` 0: as fast as possible); return every event id sent."""
    topics = Topics(PREFIX, SITE)
    sent: list[list[str]] = [[] for _ in range(devices)]
    errors: list[str] = []
    progress = [[0] for _ in range(devices)]
    start = time.monotonic() + 1.0
    threads = [threading.Thread(target=_door, args=(host, port, f"door-{i:02d}", topics, start, rate, count,
                                                      sent[i], errors, progress[i]), daemon=True)
               for i in range(devices)]
    for thread in threads:
        thread.start()
    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=devices * count)
        while any(t.is_alive() for t in threads):
            bar.update(task, completed=sum(p[0] for p in progress))
            time.sleep(POLL_S)
    if errors:
        raise BenchError("; ".join(errors[:5]))
    return [eid for ids in sent for eid in ids]


def _wait_stored(writer: _Writer, expected: int) -> float:
    start = time.monotonic()
    while writer.count() < expected:
        if time.monotonic() - start > DRAIN_DEADLINE_S:
            raise BenchError(f"only {writer.count()} of {expected} events stored after {DRAIN_DEADLINE_S}s")
        time.sleep(POLL_S / 4)
    return time.monotonic() - start


def sustained(host: str, port: int, workdir: Path, devices: int, rate: float,
              duration: float) -> dict[str, Any]:
    """The fleet-load run; raises BenchError unless every event is stored exactly once."""
    from sqlalchemy import select

    from server.db.models import EventRow

    writer = _writer(workdir / "sustained.db", host, port, f"bench-audit-{uuid.uuid4().hex[:6]}", BATCH_MAX,
                     LINGER_S)
    try:
        started = time.monotonic()
        sent = _publish(host, port, devices, rate, int(rate * duration), "sustained load")
        _wait_stored(writer, len(sent))
        elapsed = time.monotonic() - started
        with writer.db.session() as session:
            rows = session.execute(select(EventRow.event_id, EventRow.ts, EventRow.received_at)).all()
        stats = writer.subscriber.stats
    finally:
        writer.close()
    ids = [r[0] for r in rows]
    if len(ids) != len(set(ids)) or set(ids) != set(sent):
        raise BenchError(f"stored {len(ids)} rows ({len(set(ids))} distinct) for {len(sent)} sent events")
    lags = sorted((r[2] - r[1]).total_seconds() * 1000.0 for r in rows)
    return {
        "devices": devices, "rate_hz": rate, "duration_s": duration, "events": len(sent),
        "messages": stats.received, "duplicates_absorbed": stats.duplicates, "batches": stats.batches,
        "exactly_once": True, "elapsed_s": round(elapsed, 1),
        "lag_ms": {"p50": round(statistics.median(lags), 1),
                   "p99": round(lags[int(0.99 * (len(lags) - 1))], 1), "max": round(lags[-1], 1)},
    }


def drain(host: str, port: int, workdir: Path, backlog: int, batch_max: int, name: str) -> float:
    """Events/s a writer stores while draining ``backlog`` events queued during its downtime."""
    client_id = f"bench-drain-{name}-{uuid.uuid4().hex[:6]}"
    linger = LINGER_S if batch_max > 1 else 0.0
    writer = _writer(workdir / f"drain-{name}.db", host, port, client_id, batch_max, linger)
    writer.close()  # the broker keeps the persistent session and queues what follows
    devices = 10
    sent = _publish(host, port, devices, 0.0, backlog // devices, f"backlog for {name}")
    writer = _writer(workdir / f"drain-{name}.db", host, port, client_id, batch_max, linger)
    try:
        seconds = _wait_stored(writer, len(sent))
    finally:
        writer.close()
    return len(sent) / seconds


def run_bench(devices: int, rate: float, duration: float, backlog: int, host: str | None = None,
              port: int | None = None) -> dict[str, Any]:
    """Both phases against ``host:port`` or a broker started for the run."""
    from server.broker import LocalBroker

    with tempfile.TemporaryDirectory(prefix="facegate-bench-audit-") as tmp:
        workdir = Path(tmp)
        broker = None if host and port else LocalBroker(data_dir=workdir / "broker").start()
        try:
            h, p = (host, port) if broker is None else (broker.host, broker.port)
            assert h is not None and p is not None  # noqa: S101 - narrowed above
            result: dict[str, Any] = {"broker": "external" if broker is None else broker.kind}
            result["sustained"] = sustained(h, p, workdir, devices, rate, duration)
            batched = drain(h, p, workdir, backlog, BATCH_MAX, "batched")
            baseline = drain(h, p, workdir, backlog, 1, "per-message")
        finally:
            if broker is not None:
                broker.close()
    offered = devices * rate
    result["drain"] = {
        "backlog": backlog, "batched_events_per_s": round(batched, 1),
        "baseline_per_message_commit_events_per_s": round(baseline, 1),
        "ratio_batched_over_baseline": round(batched / baseline, 2),
        "headroom_over_offered_load": round(batched / offered, 1) if offered else None,
    }
    return result


@click.command("audit")
@click.option("--devices", type=click.IntRange(1, 1000), default=20, show_default=True)
@click.option("--rate", type=click.FloatRange(0.1, 1000), default=10.0, show_default=True,
              help="Events per second per device.")
@click.option("--duration", type=click.FloatRange(1, 86_400), default=300.0, show_default=True,
              help="Seconds of sustained load.")
@click.option("--backlog", type=click.IntRange(100, 10_000_000), default=20_000, show_default=True,
              help="Events queued while the server is down, for the drain phase.")
@click.option("--host", default=None, help="Use this broker instead of starting one.")
@click.option("--port", type=click.IntRange(1, 65535), default=None)
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object on stdout.")
def audit(devices: int, rate: float, duration: float, backlog: int, host: str | None, port: int | None,
          as_json: bool) -> None:
    """Audit subscriber: exactly-once storage under fleet load, and batched vs per-message drain rate."""
    try:
        result = run_bench(devices, rate, duration, backlog, host, port)
    except BenchError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(result))
        return
    s, d = result["sustained"], result["drain"]
    click.echo(f"sustained: {s['events']} events from {s['devices']} devices at {s['rate_hz']}/s for "
               f"{s['duration_s']}s -> stored exactly once ({s['duplicates_absorbed']} duplicates absorbed, "
               f"{s['batches']} batches); lag p50 {s['lag_ms']['p50']} ms, p99 {s['lag_ms']['p99']} ms, "
               f"max {s['lag_ms']['max']} ms")
    click.echo(f"drain of {d['backlog']} queued events: batched {d['batched_events_per_s']}/s, baseline "
               f"(commit per message) {d['baseline_per_message_commit_events_per_s']}/s -> "
               f"batched/baseline = {d['ratio_batched_over_baseline']}x; headroom over the offered load "
               f"{d['headroom_over_offered_load']}x")


cli = click.Group("bench", help="Benchmarks that print ratios against a baseline.")
cli.add_command(audit)
