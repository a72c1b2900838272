"""Opt-in snapshots: the face crop, the FGS1 framing, and the best-effort publisher beside the outbox,
against real mosquitto."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from skimage import data

from device.agent import FanOutSink, MemorySink, decision_to_dict
from device.metrics import DeviceMetrics
from device.mqtt.client import ClientSettings, MqttClient
from device.mqtt.outbox import MqttEventSink, Outbox
from device.mqtt.snapshots import SnapshotPublisher
from device.protocol.schemas import EventPayload, PayloadError, decision_to_event
from device.protocol.snapshots import MAGIC, decode_snapshot, encode_snapshot_frame, make_header
from device.protocol.topics import Topics
from device.types import Decision, DecisionKind, LivenessCheck, LivenessResult, LivenessVerdict
from device.vision.snapshot import SNAPSHOT_MAX_SIDE, SnapshotError, encode_snapshot, face_crop
from tests.conftest import Broker
from tests.mqtt_kit import CONNECT_S, STALL_S, Collector, wait_until

DEVICE = "door-s"
TOPICS = Topics("facegate", "hq")
# The astronaut's face in skimage's 512x512 photo (x0, y0, x1, y1).
FACE_BOX = (170.0, 60.0, 290.0, 200.0)
SPOOF = LivenessResult(LivenessVerdict.SPOOF, (LivenessCheck("passive", 0.01, LivenessVerdict.SPOOF),))


def jpeg() -> bytes:
    return encode_snapshot(data.astronaut(), FACE_BOX)


def decision(kind: DecisionKind, snapshot: bytes | None, liveness: LivenessResult | None = None) -> Decision:
    person = "astro" if kind in (DecisionKind.GRANTED, DecisionKind.DENIED) else None
    return Decision(kind, person, None, 0.4, 0.1, liveness or LivenessResult.skipped(), {"detect": 1.0},
                    snapshot=snapshot)


# ----------------------------------------------------------------------------- crop and encode


def test_crop_adds_a_margin_and_is_bounded() -> None:
    rgb = data.astronaut()
    crop = face_crop(rgb, FACE_BOX)
    assert crop.shape == (210, 180, 3)  # 120x140 box + 25 % on each side, below the bound
    big = face_crop(rgb, (0.0, 0.0, 512.0, 512.0), margin=0.0)
    assert big.shape == (SNAPSHOT_MAX_SIDE, SNAPSHOT_MAX_SIDE, 3)
    edge = face_crop(rgb, (-40.0, 480.0, 60.0, 560.0))  # partly outside: clipped to the frame
    assert edge.shape[0] == 512 - 460 and edge.shape[1] == 85
    with pytest.raises(SnapshotError):
        face_crop(rgb, (600.0, 600.0, 700.0, 700.0))


def test_snapshot_is_a_decodable_jpeg_of_the_face() -> None:
    raw = jpeg()
    image = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None and image.shape == (210, 180, 3)
    reference = cv2.cvtColor(face_crop(data.astronaut(), FACE_BOX), cv2.COLOR_RGB2BGR)
    assert float(np.abs(image.astype(np.float32) - reference).mean()) < 6.0  # lossy, but the same picture


def test_decision_snapshot_never_reaches_repr_or_the_json_lines() -> None:
    d = decision(DecisionKind.UNKNOWN, jpeg())
    assert "snapshot" not in repr(d) and "\\xff\\xd8" not in repr(d)
    assert "snapshot" not in decision_to_dict(d)
    wire = decision_to_event(d, DEVICE).to_bytes()  # events never carry the image
    assert b"\xff\xd8" not in wire and json.loads(wire)["snapshot"] is False


# ----------------------------------------------------------------------------- framing


def test_frame_round_trip_and_corruption() -> None:
    raw = jpeg()
    event = decision_to_event(decision(DecisionKind.UNKNOWN, raw), DEVICE)
    header = make_header(str(event.event_id), event.ts, DEVICE, event.decision, raw, 180, 210)
    frame = encode_snapshot_frame(header, raw)
    assert frame.startswith(MAGIC)
    parsed, image = decode_snapshot(frame)
    assert parsed.event_id == event.event_id and image == raw
    assert (parsed.decision, parsed.content_type) == ("unknown", "image/jpeg")
    assert (parsed.width, parsed.height, parsed.size) == (180, 210, len(raw))
    with pytest.raises(PayloadError, match="magic"):
        decode_snapshot(b"FGC1" + frame[4:])
    with pytest.raises(PayloadError, match="bytes"):
        decode_snapshot(frame[:-1])
    with pytest.raises(PayloadError, match="sha256"):
        decode_snapshot(frame[:-1] + bytes([frame[-1] ^ 1]))
    with pytest.raises(PayloadError, match="header length"):
        decode_snapshot(MAGIC + (1 << 20).to_bytes(4, "big") + b"{}")
    with pytest.raises(PayloadError, match="granted"):
        make_header(str(event.event_id), event.ts, DEVICE, DecisionKind.GRANTED, raw, 180, 210)


def test_mutated_frames_only_ever_raise_payload_error() -> None:
    raw = jpeg()
    event = decision_to_event(decision(DecisionKind.SPOOF, raw), DEVICE)
    frame = encode_snapshot_frame(make_header(str(event.event_id), event.ts, DEVICE, event.decision, raw,
                                              180, 210), raw)
    rng = np.random.default_rng(5)
    for _ in range(500):
        mutated = bytearray(frame[:int(rng.integers(0, len(frame) + 1))])
        for pos in rng.integers(0, max(1, len(mutated)), int(rng.integers(0, 4))):
            if mutated:
                mutated[int(pos)] = int(rng.integers(0, 256))
        try:
            _, image = decode_snapshot(bytes(mutated))
        except PayloadError:
            continue
        assert image == raw  # an image is accepted only intact (the header has no checksum of its own)


def test_fan_out_asks_for_snapshots_only_when_a_sink_does() -> None:
    class Wants(MemorySink):
        wants_snapshots = True

    assert not FanOutSink(MemorySink()).wants_snapshots
    assert FanOutSink(MemorySink(), Wants()).wants_snapshots


# ----------------------------------------------------------------------------- the publisher


def _events(outbox: Outbox) -> list[EventPayload]:
    return [EventPayload.parse(row.payload) for row in outbox.pending(limit=100)]


def test_queue_full_or_broker_away_drops_snapshots_but_never_events(tmp_path: Path) -> None:
    """No broker at all: offer() returns at once, the bounded queue drops and counts, events are stored."""
    client = MqttClient(ClientSettings("127.0.0.1", 9, "never-connected"))  # not started: never connected
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    snapshots = SnapshotPublisher(client, TOPICS, DEVICE, queue_size=1, max_age_s=2.0)
    sink = MqttEventSink(client, outbox, TOPICS, DEVICE, snapshots)
    try:
        assert sink.wants_snapshots
        for _ in range(4):
            sink.emit(decision(DecisionKind.UNKNOWN, jpeg()))
        events = _events(outbox)
        assert len(events) == 4
        flags = [e.snapshot for e in events]
        assert flags[0] and not all(flags)  # the queue (1) plus the worker's hand hold at most two
        assert snapshots.dropped >= flags.count(False)
        # the rest go stale: there is no broker
        assert wait_until(lambda: snapshots.dropped == 4, progress=lambda: snapshots.dropped)
        assert snapshots.published == 0
        metrics = DeviceMetrics()  # the counters reach Prometheus
        metrics.observe_mqtt(outbox, None, snapshots)
        samples = {(sample.name, sample.labels.get("outcome")): sample.value
                   for family in text_string_to_metric_families(metrics.scrape().decode())
                   for sample in family.samples}
        assert samples[("facegate_device_snapshots_total", "dropped")] == 4
        assert samples[("facegate_device_snapshots_total", "offered")] == snapshots.offered >= 1
        assert samples[("facegate_device_snapshots_total", "published")] == 0
        assert samples[("facegate_device_snapshot_queue_depth", None)] == 0
    finally:
        sink.close()
        snapshots.close()
        client.close()
        outbox.close()


def test_spoof_snapshot_published_granted_and_denied_never(mosquitto: Broker, tmp_path: Path) -> None:
    snap_topic, event_topic = TOPICS.snapshot(DEVICE), TOPICS.events(DEVICE)
    collector = Collector(mosquitto.host, mosquitto.port, [snap_topic, event_topic])
    client = MqttClient(ClientSettings(mosquitto.host, mosquitto.port, DEVICE)).start()
    assert client.wait_connected(CONNECT_S)
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    snapshots = SnapshotPublisher(client, TOPICS, DEVICE)
    sink = MqttEventSink(client, outbox, TOPICS, DEVICE, snapshots)
    try:
        raw = jpeg()
        for kind in (DecisionKind.GRANTED, DecisionKind.DENIED, DecisionKind.SPOOF):
            sink.emit(decision(kind, raw, SPOOF if kind is DecisionKind.SPOOF else None))
        assert collector.wait(lambda m: sum(x.topic == event_topic for x in m) == 3)
        assert collector.wait(lambda m: any(x.topic == snap_topic for x in m))
        parsed = [EventPayload.parse(m.payload) for m in collector.on_topic(event_topic)]
        events = {e.decision: e for e in parsed}
        flags = [events[k].snapshot for k in (DecisionKind.GRANTED, DecisionKind.DENIED, DecisionKind.SPOOF)]
        assert flags == [False, False, True]
        assert sink.publisher.wait_drained(STALL_S)
    finally:
        sink.close()
        snapshots.close()
        client.close()
    (message,) = collector.on_topic(snap_topic)
    collector.close()
    outbox.close()
    header, image = decode_snapshot(message.payload)
    assert header.event_id == events[DecisionKind.SPOOF].event_id and header.decision == "spoof"
    assert image == raw and message.qos == 1 and not message.retain
    if mosquitto.kind == "mosquitto":  # an MQTT 5 broker: the event id also rides as correlation data
        assert message.correlation_data == str(header.event_id).encode("ascii")
    assert snapshots.published == 1 and snapshots.dropped == 0
