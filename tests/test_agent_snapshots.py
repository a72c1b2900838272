"""Opt-in snapshots end to end: the real agent on a replay (built int8 models), its real MQTT side and
a subscriber on real mosquitto. With ``[mqtt] snapshots`` an unknown face yields one decodable JPEG
framed with its event's id; a granted face never does; by default nothing reaches the snapshot topic."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage import data

from core.protocol.schemas import EventPayload
from core.protocol.snapshots import decode_snapshot
from core.protocol.topics import Topics
from core.types import DecisionKind
from device.agent import MemorySink
from device.agent.runner import build_agent, open_gallery, open_pipeline
from device.config import DeviceConfig
from device.decide.operating_point import operating_point
from device.enroll import enroll
from device.mqtt.service import DeviceMqtt
from device.vision.snapshot import SNAPSHOT_MAX_SIDE
from tests.agent_support import (
    LIVENESS_OFF,
    WAIT_S,
    astronaut_frames,
    no_face_frames,
    save_rgb,
    stranger_frames,
    write_frames,
)
from tests.conftest import Broker
from tests.mqtt_kit import CONNECT_S, STALL_S, Collector

SITE, DEVICE = "hq", "door-snap"
POINT = operating_point(1)  # the calibrated open-set operating point for one enrolled person


def _config(tmp_path: Path, models: Path, frames: Path, broker: Broker, snapshots: bool) -> DeviceConfig:
    return DeviceConfig.model_validate({
        "device": {"id": DEVICE, "site": SITE, "data_dir": str(tmp_path / "data")},
        "models": {"dir": str(models)},
        "camera": {"type": "replay", "path": str(frames), "fps": 10.0, "loop": False},
        "door": {"type": "simulated", "unlock_seconds": 5.0},
        "decision": {"tau": POINT.tau, "delta": POINT.delta, "confirm_k": 2, "confirm_n": 3,
                     "cooldown_s": 600.0,
                     "track_timeout_s": 1.0},
        "loop": {"queue_size": 512},
        # A SIEM subscribes here, no facegate server: nobody sends event receipts.
        "mqtt": {"enabled": True, "host": broker.host, "port": broker.port, "homeassistant": False,
                 "snapshots": snapshots, "confirm_events": False},
        "bundle": {"enabled": False},
        "liveness": LIVENESS_OFF,
    })


@pytest.mark.parametrize("snapshots", [True, False], ids=["snapshots-on", "snapshots-off"])
def test_unknown_gets_a_snapshot_only_when_opted_in(tmp_path: Path, built_models: Path, mosquitto: Broker,
                                                     snapshots: bool) -> None:
    frames = write_frames(tmp_path / "frames", no_face_frames(4) + astronaut_frames(8) + no_face_frames(20)
                          + stranger_frames(6) + no_face_frames(4))
    config = _config(tmp_path, built_models, frames, mosquitto, snapshots)
    photo = save_rgb(tmp_path / "enroll" / "astronaut.png", data.astronaut())
    with open_pipeline(config) as pipeline, open_gallery(config, pipeline) as gallery:
        assert enroll(config, pipeline, gallery, "astro", "Astronaut", [photo])[0].accepted
    topics = Topics(config.mqtt.prefix, SITE)
    event_topic, snap_topic = topics.events(DEVICE), topics.snapshot(DEVICE)
    subscriber = Collector(mosquitto.host, mosquitto.port, [event_topic, snap_topic], client_id="siem")

    memory = MemorySink()
    agent = build_agent(config, sinks=[memory])
    mqtt = DeviceMqtt(config, agent)
    agent.add_sink(mqtt.sink)
    try:
        mqtt.start()
        assert mqtt.client.wait_connected(CONNECT_S)
        agent.start()
        assert agent.wait(WAIT_S)
        assert [(d.kind, d.person_id) for d in memory.decisions] == [
            (DecisionKind.GRANTED, "astro"), (DecisionKind.UNKNOWN, None)]
        assert subscriber.wait(lambda ms: sum(m.topic == event_topic for m in ms) >= 2)
        if snapshots:
            assert subscriber.wait(lambda ms: any(m.topic == snap_topic for m in ms))
        assert mqtt.sink.publisher.wait_drained(STALL_S)
    finally:
        agent.stop()
        mqtt.close()
        subscriber.close()

    parsed = [EventPayload.parse(m.payload) for m in subscriber.on_topic(event_topic)]
    events = {e.decision: e for e in parsed}
    granted, unknown = events[DecisionKind.GRANTED], events[DecisionKind.UNKNOWN]
    assert granted.snapshot is False and unknown.snapshot is snapshots
    received = subscriber.on_topic(snap_topic)
    if not snapshots:  # no snapshot publisher exists at all, so nothing can come later either
        assert received == [] and mqtt.snapshots is None
        return
    (message,) = received  # one for the unknown face, none for the granted one
    header, jpeg = decode_snapshot(message.payload)
    assert header.event_id == unknown.event_id and header.device == DEVICE and header.decision == "unknown"
    assert header.ts == unknown.ts and message.qos == 1
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None and image.shape[:2] == (header.height, header.width)
    assert 32 <= max(image.shape[:2]) <= SNAPSHOT_MAX_SIDE
    assert mqtt.snapshots is not None and (mqtt.snapshots.published, mqtt.snapshots.dropped) == (1, 0)
    print(f"snapshot {header.width}x{header.height}, {header.size} bytes for event {header.event_id}")
