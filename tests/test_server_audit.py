"""The audit subscriber against a real mosquitto: events stored exactly once by event id, availability,
status and acks; a 20-device x 10 ev/s x 60 s load test. The 5-minute version is `facegate bench audit`.
Each test runs on SQLite and on the throwaway PostgreSQL (``db_url``).
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Iterator
from threading import Thread

import pytest
from sqlalchemy import func, select

from core.protocol.topics import Topics
from core.types import DecisionKind
from server.audit.subscriber import AuditSubscriber
from server.audit.transport import ManualAckSource
from server.config import MqttConfig
from server.db.models import BundleAckRow, Device, EventRow
from server.db.session import Database
from tests.conftest import Broker
from tests.mqtt_kit import CONNECT_S
from tests.server_support import PREFIX, SITE, SimDevice, delta_ack, event_payload, status_payload, wait_until

LOAD_DEVICES = 20
LOAD_RATE_HZ = 10.0
LOAD_SECONDS = 60
DUPLICATE_EVERY = 50  # each device re-sends every 50th event, as a door does after a lost PUBACK


class Audit:
    """A database plus a running subscriber connected to the test broker."""

    def __init__(self, db_url: str, broker: Broker) -> None:
        self.db = Database(db_url)
        self.db.migrate()
        self.topics = Topics(PREFIX, SITE)
        self.subscriber = AuditSubscriber(self.db, self.topics).start()
        config = MqttConfig(host=broker.host, port=broker.port, prefix=PREFIX, site=SITE,
                            client_id=f"audit-{uuid.uuid4().hex[:8]}")
        self.source = ManualAckSource(config, self.subscriber.filters, self.subscriber.handle).start()
        assert self.source.wait_connected(CONNECT_S), "audit subscriber did not connect"

    def count(self) -> int:
        with self.db.session() as session:
            return session.scalar(select(func.count()).select_from(EventRow)) or 0

    def close(self) -> None:
        self.source.close()
        self.subscriber.close()
        self.db.close()


@pytest.fixture()
def audit(db_url: str, mosquitto: Broker) -> Iterator[Audit]:
    running = Audit(db_url, mosquitto)
    try:
        yield running
    finally:
        running.close()


def test_events_status_availability_and_acks_are_stored(audit: Audit, mosquitto: Broker) -> None:
    door = SimDevice(mosquitto.host, mosquitto.port, "door-1")
    try:
        door.online()
        door.status(status_payload("door-1", bundle=3, delta=2))
        first = event_payload("door-1", seq=1)
        door.event(first)
        door.event(first)  # redelivery of the same event id
        door.event(event_payload("door-1", seq=2, kind=DecisionKind.UNKNOWN, person_id=None, name=None))
        door.ack(delta_ack("door-1", 2))
        door.flush()
        wait_until(lambda: audit.count() == 2 and audit.subscriber.stats.received >= 6, "stored messages")
    finally:
        door.close()
    with audit.db.session() as session:
        rows = session.scalars(select(EventRow).order_by(EventRow.id)).all()
        assert rows[0].event_id == str(first.event_id)
        assert [r.kind for r in rows] == ["granted", "unknown"]
        assert rows[0].person_name == "Ada" and rows[1].person_id is None
        assert rows[0].ts == first.ts
        device = session.get(Device, "door-1")
        assert device is not None
        assert device.available == "online"
        assert device.bundle_sequence == 3 and device.delta_sequence == 2
        assert device.software_version == "0.1.0" and device.status["door"] == "locked"
        ack = session.scalar(select(BundleAckRow).where(BundleAckRow.kind == "delta"))
        assert ack is not None and (ack.sequence, ack.state) == (2, "applied")
    assert audit.subscriber.stats.duplicates == 1


def test_invalid_and_spoofed_messages_are_refused_without_stopping(audit: Audit, mosquitto: Broker) -> None:
    door = SimDevice(mosquitto.host, mosquitto.port, "door-2")
    try:
        door.publish(audit.topics.events("door-2"), b"{not json")
        door.publish(audit.topics.events("door-2"), b'{"schema_version": 1, "event_id": "x"}')
        # A payload naming another device than its topic is refused (ACLs bind devices to topics).
        door.publish(audit.topics.events("door-2"), event_payload("door-9").to_bytes())
        door.publish(audit.topics.available("door-2"), b"maybe")
        good = event_payload("door-2", seq=7)
        door.event(good)
        door.flush()
        wait_until(lambda: audit.count() == 1 and audit.subscriber.stats.invalid >= 4, "the valid event")
    finally:
        door.close()
    assert audit.subscriber.stats.invalid == 4
    with audit.db.session() as session:
        assert session.scalar(select(EventRow.event_id)) == str(good.event_id)


def test_offline_last_will_marks_device_offline(audit: Audit, mosquitto: Broker) -> None:
    door = SimDevice(mosquitto.host, mosquitto.port, "door-3")
    door.online()
    door.flush()

    def state() -> str | None:
        with audit.db.session() as session:
            device = session.get(Device, "door-3")
            return device.available if device else None

    wait_until(lambda: state() == "online", "online")
    sock = door.client.socket()
    assert sock is not None
    sock.close()  # vanish without DISCONNECT: the broker publishes the will
    door.client.loop_stop()
    wait_until(lambda: state() == "offline", "the last will")


def test_events_published_while_the_server_is_down_arrive_after_restart(db_url: str,
                                                                        mosquitto: Broker) -> None:
    db = Database(db_url)
    db.migrate()
    topics = Topics(PREFIX, SITE)
    config = MqttConfig(host=mosquitto.host, port=mosquitto.port, prefix=PREFIX, site=SITE,
                        client_id="audit-persistent")
    sub = AuditSubscriber(db, topics).start()
    source = ManualAckSource(config, sub.filters, sub.handle).start()
    assert source.wait_connected(CONNECT_S)
    source.close()
    sub.close()
    door = SimDevice(mosquitto.host, mosquitto.port, "door-4")
    sent = [event_payload("door-4", seq=i) for i in range(25)]
    for ev in sent:
        door.event(ev)
    door.flush()
    door.close()
    sub = AuditSubscriber(db, topics).start()  # same client id: the broker kept the session and queued
    source = ManualAckSource(config, sub.filters, sub.handle).start()
    try:
        def stored() -> set[str]:
            with db.session() as session:
                return set(session.scalars(select(EventRow.event_id)))

        wait_until(lambda: len(stored()) == len(sent), "queued events")
        assert stored() == {str(ev.event_id) for ev in sent}
    finally:
        source.close()
        sub.close()
        db.close()


def _run_device(host: str, port: int, device_id: str, start: float, sent: list[str],
                errors: list[str]) -> None:
    try:
        door = SimDevice(host, port, device_id)
    except AssertionError as exc:
        errors.append(str(exc))
        return
    try:
        total = int(LOAD_RATE_HZ * LOAD_SECONDS)
        for i in range(total):
            delay = start + i / LOAD_RATE_HZ - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            ev = event_payload(device_id, seq=i, kind=DecisionKind.GRANTED if i % 3 else DecisionKind.UNKNOWN)
            door.event(ev)
            if i % DUPLICATE_EVERY == 0:
                door.event(ev)
            sent.append(str(ev.event_id))
            if len(door.infos) > 200:
                door.flush()
        door.flush()
    except Exception as exc:  # surfaced by the main thread's assertion
        errors.append(f"{device_id}: {exc!r}")
    finally:
        door.close()


@pytest.mark.slow
def test_load_20_devices_10_events_per_second_for_60_seconds(audit: Audit, mosquitto: Broker) -> None:
    sent: dict[str, list[str]] = {f"door-{i:02d}": [] for i in range(LOAD_DEVICES)}
    errors: list[str] = []
    start = time.monotonic() + 1.0
    threads = [Thread(target=_run_device, args=(mosquitto.host, mosquitto.port, d, start, sent[d], errors))
               for d in sent]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    publish_s = time.monotonic() - start
    assert not errors, errors
    expected = {eid for ids in sent.values() for eid in ids}
    assert len(expected) == LOAD_DEVICES * LOAD_RATE_HZ * LOAD_SECONDS
    wait_until(lambda: audit.count() >= len(expected), "every event stored")
    drained_s = time.monotonic() - start
    with audit.db.session() as session:
        stored = list(session.scalars(select(EventRow.event_id)))
        lags = [(r.received_at - r.ts).total_seconds() for r in session.scalars(select(EventRow))]
        counts = select(EventRow.device_id, func.count()).group_by(EventRow.device_id)
        per_device = {device: n for device, n in session.execute(counts).all()}
    assert len(stored) == len(set(stored)) == len(expected)
    assert set(stored) == expected
    assert per_device == {d: int(LOAD_RATE_HZ * LOAD_SECONDS) for d in sent}
    stats = audit.subscriber.stats
    assert stats.duplicates >= LOAD_DEVICES * (LOAD_RATE_HZ * LOAD_SECONDS // DUPLICATE_EVERY)
    lags.sort()
    print(f"\naudit load: {len(stored)} events from {LOAD_DEVICES} devices, published in {publish_s:.1f}s, "
          f"all stored {drained_s:.1f}s after start; {stats.received} messages in {stats.batches} batches "
          f"(mean {stats.received / max(1, stats.batches):.1f}/batch), {stats.duplicates} duplicates "
          "absorbed; "
          f"publish->commit lag p50 {statistics.median(lags) * 1000:.0f} ms, "
          f"p99 {lags[int(0.99 * (len(lags) - 1))] * 1000:.0f} ms")


def test_reports_out_of_order_never_step_back_and_a_clock_once_ahead_is_not_ignored(db_url: str) -> None:
    """Replicas store a door's reports in any order: an older status or ack never replaces a newer one;
    but a door whose clock once ran a day ahead is heard again once its clock is corrected."""
    import datetime as dt

    from core.protocol.schemas import BundleAck
    from server.audit.store import Parsed, apply_batch, parse

    topics = Topics(PREFIX, SITE)
    database = Database(db_url)
    database.migrate()
    now = dt.datetime.now(dt.UTC)

    def store(topic: str, payload: bytes) -> None:
        parsed = parse(topics, topic, payload, received_at=now)
        assert isinstance(parsed, Parsed)
        with database.transaction() as session:
            apply_batch(session, [parsed])

    def status(bundle: int, ts: dt.datetime) -> bytes:
        return status_payload("door-1", bundle=bundle).model_copy(update={"ts": ts}).to_bytes()

    def ack(state: str, ts: dt.datetime) -> bytes:
        return BundleAck(device="door-1", sequence=4, state=state, ts=ts).to_bytes()

    try:
        store(topics.status("door-1"), status(3, now - dt.timedelta(seconds=5)))
        store(topics.status("door-1"), status(2, now - dt.timedelta(seconds=9)))  # older, stored later
        store(topics.bundle_ack("door-1"), ack("installed", now - dt.timedelta(seconds=4)))
        store(topics.bundle_ack("door-1"), ack("downloading", now - dt.timedelta(seconds=8)))
        with database.session() as session:
            assert session.get(Device, "door-1").bundle_sequence == 3  # type: ignore[union-attr]
            assert session.scalars(select(BundleAckRow.state)).all() == ["installed"]

        store(topics.status("door-1"), status(5, now + dt.timedelta(days=1)))  # the clock ran ahead
        store(topics.status("door-1"), status(6, now + dt.timedelta(seconds=1)))  # ... and was corrected
        with database.session() as session:
            assert session.get(Device, "door-1").bundle_sequence == 6  # type: ignore[union-attr]
    finally:
        database.close()
