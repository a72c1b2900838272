"""Events are never lost: a broker outage while the device keeps deciding, against a real broker.

The phases follow the device's progress, not the clock: events flow before the outage, the outage
lasts until the door has made OUTAGE_EVENTS decisions on its own, and events flow again after it."""

from __future__ import annotations

import threading
from pathlib import Path

from device.mqtt.client import ClientSettings, MqttClient
from device.mqtt.outbox import MqttEventSink, Outbox
from device.protocol.schemas import EventPayload
from device.protocol.topics import Topics
from device.types import Decision, DecisionKind, LivenessResult
from tests.conftest import Broker
from tests.mqtt_kit import CONNECT_S, Collector, wait_until

RATE_HZ = 10.0  # decisions per second from the producer
# Decisions before the outage (delivered), during it (stored in the outbox only), and after it.
BEFORE_EVENTS, OUTAGE_EVENTS, AFTER_EVENTS = 20, 150, 20


class DecisionProducer(threading.Thread):
    """Emits numbered decisions through the real MQTT sink at a steady rate (the door keeps deciding)."""

    def __init__(self, sink: MqttEventSink) -> None:
        super().__init__(daemon=True)
        self.sink = sink
        self.count = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(1.0 / RATE_HZ):
            decision = Decision(DecisionKind.GRANTED, f"p{self.count}", "Ada", 0.8, 0.2,
                                LivenessResult.skipped(), {"detect": 1.0})
            self.sink.emit(decision)
            self.count += 1


def _dedupe(collector: Collector, topic: str) -> tuple[list[EventPayload], int]:
    seen: set[str] = set()
    unique: list[EventPayload] = []
    duplicates = 0
    for message in collector.on_topic(topic):
        event = EventPayload.parse(message.payload)
        if str(event.event_id) in seen:
            duplicates += 1
            continue
        seen.add(str(event.event_id))
        unique.append(event)
    return unique, duplicates


def test_broker_outage_loses_no_event(mosquitto: Broker, tmp_path: Path) -> None:
    topics = Topics("facegate", "site")
    topic = topics.events("door-1")
    server = Collector(mosquitto.host, mosquitto.port, [topics.all_events], client_id="audit-server",
                       persistent=True)
    client = MqttClient(ClientSettings(mosquitto.host, mosquitto.port, "door-1")).start()
    assert client.wait_connected(CONNECT_S)
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    sink = MqttEventSink(client, outbox, topics, "door-1")
    producer = DecisionProducer(sink)
    try:
        producer.start()
        assert server.wait(lambda ms: len(ms) >= BEFORE_EVENTS)
        mosquitto.stop()
        at_stop = producer.count
        assert wait_until(lambda: producer.count >= at_stop + OUTAGE_EVENTS, progress=lambda: producer.count)
        during = producer.count - at_stop
        assert outbox.depth >= during - 1  # everything decided while the broker was away is on disk
        mosquitto.start()
        assert client.wait_connected(CONNECT_S)
        after = producer.count
        assert wait_until(lambda: producer.count >= after + AFTER_EVENTS, progress=lambda: producer.count)
        producer.stop.set()
        producer.join()
        emitted = producer.count
        assert wait_until(lambda: len(_dedupe(server, topic)[0]) >= emitted,
                          progress=lambda: len(server.messages))
        assert wait_until(lambda: outbox.depth == 0, progress=lambda: outbox.depth)
    finally:
        producer.stop.set()
        sink.close()
        client.close()
        server.close()
        outbox.close()
    unique, duplicates = _dedupe(server, topic)
    print(f"emitted {emitted} events ({during} during the outage); received "
          f"{len(unique)} unique, {duplicates} duplicates dropped")
    assert len(unique) == emitted
    assert [e.person_id for e in unique] == [f"p{i}" for i in range(emitted)]  # every event once, in order
    seqs = [e.seq for e in unique]
    assert seqs == sorted(seqs) and len(set(seqs)) == emitted
    assert during > 0  # the door kept deciding while the broker was down
