"""Events are never lost, against a real broker and the real audit subscriber with its receipts.

- A broker outage while the door keeps deciding: every event reaches the audit log exactly once, the
  outbox empties on the server's receipts. On a broker without persistence (amqtt) the server's
  session is gone after the restart, so events the door replays before the server has subscribed
  again are lost at the broker; the receipts make the door send them again.
- A broker restarted without persistence while the server is away: what the broker had queued for the
  server is gone, and the door still delivers it once the server is back: at once on the server's
  hello, or on its own retry when that hello is lost.

The phases follow progress, not the clock: the outage lasts until the door made OUTAGE_EVENTS decisions.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from core.mqtt.client import ClientSettings, Message, MqttClient
from core.protocol.schemas import EventConfirm
from core.protocol.topics import Topics
from core.types import Decision, DecisionKind, LivenessResult
from device.mqtt.outbox import CONFIRM_WAIT_MAX_S, MqttEventSink, Outbox
from server.audit.receipts import Receipts
from server.audit.subscriber import AuditSubscriber
from server.audit.transport import ManualAckSource
from server.broker import LocalBroker
from server.config import MqttConfig
from server.db.models import EventRow
from server.db.session import Database
from tests.mqtt_kit import CONNECT_S, STALL_S, wait_until

RATE_HZ = 10.0  # decisions per second from the producer
# Decisions before the outage (stored), during it (kept in the outbox only), and after it.
BEFORE_EVENTS, OUTAGE_EVENTS, AFTER_EVENTS = 20, 150, 20
TOPICS = Topics("facegate", "site")
DEVICE = "door-1"


class DecisionProducer(threading.Thread):
    """Emits numbered decisions through the real MQTT sink at a steady rate (the door keeps deciding)."""

    def __init__(self, sink: MqttEventSink) -> None:
        super().__init__(daemon=True)
        self.sink = sink
        self.count = 0
        self.stop = threading.Event()

    def emit(self) -> None:
        """One decision now."""
        decision = Decision(DecisionKind.GRANTED, f"p{self.count}", "Ada", 0.8, 0.2,
                            LivenessResult.skipped(), {"detect": 1.0})
        self.sink.emit(decision)
        self.count += 1

    def run(self) -> None:
        while not self.stop.wait(1.0 / RATE_HZ):
            self.emit()


class AuditServer:
    """The server's audit side as ``AppState.start_mqtt`` wires it: a persistent session, receipts and,
    unless ``hello`` is off, the empty receipt that tells the doors it subscribed again."""

    def __init__(self, db: Database, broker: LocalBroker, hello: bool = True) -> None:
        receipts = Receipts(db, TOPICS, self._publish)
        self.subscriber = AuditSubscriber(db, TOPICS, on_events_stored=receipts.stored).start()
        config = MqttConfig(host=broker.host, port=broker.port, prefix=TOPICS.prefix, site=TOPICS.site,
                            client_id="audit-persistent")
        self.source = ManualAckSource(config, self.subscriber.filters, self.subscriber.handle,
                                      on_subscribed=receipts.hello if hello else None).start()
        assert self.source.wait_connected(CONNECT_S)

    def _publish(self, topic: str, payload: bytes) -> None:
        self.source.publish(topic, payload)

    def close(self) -> None:
        self.source.close()
        self.subscriber.close()


class Door:
    """A door's event path: client, outbox, sink with receipts (as ``DeviceMqtt`` wires it)."""

    def __init__(self, broker: LocalBroker, tmp_path: Path) -> None:
        self.client = MqttClient(ClientSettings(broker.host, broker.port, f"door-{uuid.uuid4().hex[:6]}"))
        self.outbox = Outbox(tmp_path / "outbox.sqlite3")
        self.sink = MqttEventSink(self.client, self.outbox, TOPICS, DEVICE, confirm=True)
        self.client.subscribe(TOPICS.events_confirm(DEVICE), self._on_receipt)
        self.client.start()
        assert self.client.wait_connected(CONNECT_S)

    def _on_receipt(self, message: Message) -> None:
        self.sink.publisher.on_receipt(EventConfirm.parse(message.payload).seqs)

    def close(self) -> None:
        self.sink.close()
        self.client.close()
        self.outbox.close()


@pytest.fixture()
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'audit.db'}")
    database.migrate()
    yield database
    database.close()


def stored(db: Database) -> list[tuple[int, str | None]]:
    """(seq, person id) of every stored event, in seq order."""
    with db.session() as session:
        rows = [(int(r.payload["seq"]), r.person_id) for r in session.scalars(select(EventRow))]
    return sorted(rows)


def test_broker_outage_loses_no_event(mosquitto: LocalBroker, tmp_path: Path, db: Database) -> None:
    server = AuditServer(db, mosquitto)
    door = Door(mosquitto, tmp_path)
    producer = DecisionProducer(door.sink)
    try:
        producer.start()
        assert wait_until(lambda: len(stored(db)) >= BEFORE_EVENTS, progress=lambda: producer.count)
        mosquitto.stop()
        at_stop = producer.count
        assert wait_until(lambda: producer.count >= at_stop + OUTAGE_EVENTS, progress=lambda: producer.count)
        during = producer.count - at_stop
        assert door.outbox.depth >= during - 1  # everything decided while the broker was away is on disk
        mosquitto.start()
        assert door.client.wait_connected(CONNECT_S)
        after = producer.count
        assert wait_until(lambda: producer.count >= after + AFTER_EVENTS, progress=lambda: producer.count)
        producer.stop.set()
        producer.join()
        emitted = producer.count
        assert wait_until(lambda: len(stored(db)) >= emitted, progress=lambda: len(stored(db)))
        assert wait_until(lambda: door.outbox.depth == 0, progress=lambda: door.outbox.depth)
    finally:
        producer.stop.set()
        door.close()
        server.close()
    rows = stored(db)
    print(f"{mosquitto.kind}: emitted {emitted} events ({during} during the outage); stored {len(rows)}, "
          f"{server.subscriber.stats.duplicates} duplicates absorbed, {door.sink.publisher.resent} sent "
          "again for want of a receipt")
    assert rows == [(i + 1, f"p{i}") for i in range(emitted)]  # every event once; seq = outbox order
    assert during > 0  # the door kept deciding while the broker was down


@pytest.mark.parametrize("hello", [True, False], ids=["server-says-hello", "door-retries-alone"])
def test_a_broker_restart_without_persistence_while_the_server_is_away_loses_nothing(
        tmp_path: Path, db: Database, forgetful_broker: LocalBroker, hello: bool) -> None:
    broker = forgetful_broker
    door = Door(broker, tmp_path)
    producer = DecisionProducer(door.sink)
    try:
        server = AuditServer(db, broker, hello)
        for _ in range(5):
            producer.emit()
        assert wait_until(lambda: door.outbox.depth == 0, progress=lambda: door.outbox.depth)
        server.close()  # the server goes away; its persistent session keeps collecting at the broker
        for _ in range(10):
            producer.emit()
        # The broker took them all (PUBACK) for the absent server, but the door still holds them.
        publisher = door.sink.publisher
        assert wait_until(lambda: door.outbox.depth == 10 and publisher.awaiting_receipt == 10
                          and door.client.connected, progress=lambda: publisher.awaiting_receipt)
        broker.stop()  # ... and forgets them: no persistence
        broker.start()
        assert door.client.wait_connected(CONNECT_S)
        server = AuditServer(db, broker, hello)
        # No new decision: the server's hello, or else the door's own retry (its interval grows up to
        # CONFIRM_WAIT_MAX_S while nobody confirms), brings them back.
        assert wait_until(lambda: len(stored(db)) == 15, CONFIRM_WAIT_MAX_S + STALL_S,
                          progress=lambda: door.sink.publisher.resent)
        assert wait_until(lambda: door.outbox.depth == 0, progress=lambda: door.outbox.depth)
        server.close()
    finally:
        door.close()
    assert stored(db) == [(i + 1, f"p{i}") for i in range(15)]
    assert door.sink.publisher.resent >= 10
