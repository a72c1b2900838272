"""The device's MQTT side against real mosquitto: availability + will, status, commands, HA discovery."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from core.mqtt.client import Message
from core.protocol.schemas import CommandRequest, CommandResponse, StatusPayload, utcnow
from core.protocol.topics import HA_STATUS_TOPIC, Topics
from core.types import DecisionKind
from device.config import DeviceConfig
from device.door import SimulatedDoor
from device.mqtt.service import DeviceMqtt
from tests.conftest import Broker
from tests.mqtt_kit import ACK_S, CONNECT_S, Collector, wait_until

SITE, DEVICE = "hq", "door-7"


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The agent status fields the status topic reads."""

    fps: float
    queue_drops: int
    door_state: str
    model_version: str = "embedder-int8@1"
    gallery_version: str = "4-0123456789ab"
    liveness: str = "passive + challenge on uncertain"
    warnings: dict[str, str] = field(default_factory=dict)


class DoorAgent:
    """Agent stand-in for commands: a real (simulated-relay) door, a reload counter."""

    def __init__(self) -> None:
        self.door = SimulatedDoor(unlock_seconds=5.0)
        self.reloads = 0
        self.unlocks: list[tuple[str, str]] = []

    def status(self) -> Snapshot:
        return Snapshot(fps=12.5, queue_drops=3, door_state=self.door.state.value)

    def manual_unlock(self, seconds: float | None = None, *, requested_by: str = "",
                      correlation_id: str = "") -> float:
        self.unlocks.append((requested_by, correlation_id))
        return self.door.manual_unlock(seconds)

    def reload(self) -> str:
        self.reloads += 1
        return f"gallery v{self.reloads}"


def device_config(broker: Broker, data_dir: Path) -> DeviceConfig:
    """A device config built through the real pydantic model."""
    return DeviceConfig.model_validate({
        "device": {"id": DEVICE, "site": SITE, "data_dir": str(data_dir)},
        "mqtt": {"enabled": True, "host": broker.host, "port": broker.port, "status_interval_s": 1},
    })


@pytest.fixture()
def device(mosquitto: Broker, tmp_path: Path) -> Iterator[tuple[DeviceMqtt, DoorAgent]]:
    agent = DoorAgent()
    mqtt = DeviceMqtt(device_config(mosquitto, tmp_path / "dev"), agent).start()
    assert mqtt.client.wait_connected(CONNECT_S)
    yield mqtt, agent
    mqtt.close()
    agent.door.close()


REQUIRED = {
    "lock": {"command_topic", "state_topic", "payload_lock", "payload_unlock", "state_locked",
             "state_unlocked"},
    "event": {"state_topic", "event_types"},
    "sensor": {"state_topic", "value_template"},
}


def test_home_assistant_discovery(device: tuple[DeviceMqtt, DoorAgent], mosquitto: Broker) -> None:
    topics = Topics("facegate", SITE)
    ha = Collector(mosquitto.host, mosquitto.port, ["homeassistant/+/+/+/config", topics.all_available,
                                                    topics.all_status], client_id="homeassistant")
    try:
        # Distinct topics: a config may arrive twice (retained on subscribe, and live from the connect).
        assert ha.wait(lambda ms: len({m.topic for m in ms if m.topic.endswith("/config")}) >= 8)
        configs = {m.topic: json.loads(m.payload) for m in ha.messages if m.topic.endswith("/config")}
        components = sorted(topic.split("/")[1] for topic in configs)
        assert components == ["event", "lock"] + ["sensor"] * 6
        for topic, config in configs.items():
            component = topic.split("/")[1]
            assert REQUIRED[component] <= set(config), topic
            availability = {"topic": topics.available(DEVICE), "payload_available": "online",
                            "payload_not_available": "offline"}
            assert config["availability"] == [availability]
            assert config["unique_id"] and config["device"]["identifiers"]
            assert topic.split("/")[2] == DEVICE  # node id = device id (the broker ACL allows only that)
        late = Collector(mosquitto.host, mosquitto.port, ["homeassistant/+/+/+/config"], client_id="ha-late")
        try:  # retained: a Home Assistant that starts later gets every config from the broker
            assert late.wait(lambda ms: len({m.topic for m in ms if m.retain}) >= 8)
        finally:
            late.close()
        names = {c["name"] for c in configs.values()}
        assert {"Door", "Access", "Last person", "Frame rate", "Model version", "Liveness",
                "Security warnings"} <= names
        event = next(c for c in configs.values() if "event_types" in c)
        assert event["event_types"] == [k.value for k in DecisionKind]  # manual_unlock, door_fault too
        assert {"granted", "spoof", "manual_unlock", "door_fault"} <= set(event["event_types"])
        online = topics.available(DEVICE)
        assert ha.wait(lambda ms: any(m.topic == online and m.payload == b"online" for m in ms))
        assert ha.wait(lambda ms: any(m.topic == topics.status(DEVICE) for m in ms))
        status = StatusPayload.parse(ha.on_topic(topics.status(DEVICE))[-1].payload)
        assert (status.fps, status.door, status.versions.model) == (12.5, "locked", "embedder-int8@1")

        before = len(ha.messages)
        ha.client.publish(HA_STATUS_TOPIC, b"online", qos=1).wait_for_publish(ACK_S)
        assert ha.wait(lambda ms: len({m.topic for m in ms[before:] if m.topic.endswith("/config")}) >= 8)
    finally:
        ha.close()


# The Home Assistant MQTT discovery fields we rely on (HA 2025.10+ MQTT docs), per component: a config
# may carry only these, so a renamed or deprecated field (object_id) fails here, not silently in HA.
HA_COMMON = {"name", "unique_id", "default_entity_id", "device", "availability", "qos", "icon",
             "entity_category", "state_topic", "value_template", "json_attributes_topic",
             "json_attributes_template"}
HA_FIELDS = {
    "lock": HA_COMMON | {"command_topic", "command_template", "payload_lock", "payload_unlock",
                         "state_locked", "state_unlocked", "state_jammed", "optimistic"},
    "event": HA_COMMON | {"event_types"},
    "sensor": HA_COMMON | {"unit_of_measurement", "state_class"},
}
HA_DEVICE_FIELDS = {"identifiers", "name", "manufacturer", "model", "sw_version", "suggested_area"}
HA_AVAILABILITY_FIELDS = {"topic", "payload_available", "payload_not_available"}


def test_end_to_end_home_assistant_discovery_fields(device: tuple[DeviceMqtt, DoorAgent],
                                                    mosquitto: Broker) -> None:
    """Every discovery config, as HA receives it, uses only the fields HA honours, with valid values."""
    topics = Topics("facegate", SITE)
    ha = Collector(mosquitto.host, mosquitto.port, ["homeassistant/+/+/+/config"], client_id="ha-fields")
    try:
        assert ha.wait(lambda ms: len({m.topic for m in ms}) >= 8)
        configs = {m.topic: json.loads(m.payload) for m in ha.messages}
    finally:
        ha.close()
    # HA may read only these (deploy/mosquitto/facegate.acl): an entity on another topic stays empty.
    readable = {topics.status(DEVICE), topics.available(DEVICE), topics.events(DEVICE)}
    entity_ids: set[str] = set()
    for topic, config in configs.items():
        component = topic.split("/")[1]
        assert component in HA_FIELDS, topic
        assert set(config) <= HA_FIELDS[component], (topic, set(config) - HA_FIELDS[component])
        assert REQUIRED[component] <= set(config), topic
        assert "object_id" not in config, "object_id is deprecated (HA 2025.10) and ignored from 2026.4"
        domain, _, object_part = config["default_entity_id"].partition(".")
        assert domain == component and object_part and set(object_part) <= set(
            "abcdefghijklmnopqrstuvwxyz0123456789_"), config["default_entity_id"]
        entity_ids.add(config["default_entity_id"])
        assert set(config["device"]) <= HA_DEVICE_FIELDS
        assert all(set(entry) <= HA_AVAILABILITY_FIELDS for entry in config["availability"])
        assert config.get("entity_category", "diagnostic") in {"config", "diagnostic"}
        assert config.get("state_class", "measurement") in {"measurement", "total", "total_increasing"}
        assert config.get("qos", 0) in {0, 1, 2}
        read = {config[k] for k in ("state_topic", "json_attributes_topic") if k in config}
        read |= {entry["topic"] for entry in config["availability"]}
        assert read <= readable, (topic, read - readable)
        if "command_topic" in config:
            assert config["command_topic"] == topics.command(DEVICE, "unlock")
    assert len(entity_ids) == len(configs), "default_entity_id must be unique per entity"


def _command(server: Collector, name: str, payload: bytes) -> CommandResponse:
    topics = Topics("facegate", SITE)
    response_topic = topics.command_response(DEVICE, name)
    before = len(server.on_topic(response_topic))
    server.client.publish(topics.command(DEVICE, name), payload, qos=1).wait_for_publish(ACK_S)
    assert server.wait(lambda ms: len([m for m in ms if m.topic == response_topic]) > before)
    return CommandResponse.parse(server.on_topic(response_topic)[-1].payload)


def test_commands_answer_with_correlation_id(device: tuple[DeviceMqtt, DoorAgent], mosquitto: Broker) -> None:
    _, agent = device
    topics = Topics("facegate", SITE)
    server = Collector(mosquitto.host, mosquitto.port, [f"{topics.device(DEVICE)}/cmd/+/response",
                                                        "replies/#"], client_id="server")
    try:
        reply = _command(server, "unlock", CommandRequest(correlation_id="c-1", seconds=2, ts=utcnow(),
                                                          requested_by="reception").to_bytes())
        assert (reply.ok, reply.correlation_id, reply.command) == (True, "c-1", "unlock")
        assert agent.door.state.value == "unlocked" and agent.unlocks == [("reception", "c-1")]
        reply = _command(server, "reload", CommandRequest(correlation_id="c-2", ts=utcnow()).to_bytes())
        assert (reply.ok, reply.correlation_id, agent.reloads) == (True, "c-2", 1)
        reply = _command(server, "dance", CommandRequest(correlation_id="c-3", ts=utcnow()).to_bytes())
        assert not reply.ok and "unknown command" in reply.detail
        reply = _command(server, "unlock", b'{"schema_version": 1, "seconds": "many"}')
        assert not reply.ok and reply.correlation_id is None and "malformed" in reply.detail
        reply = _command(server, "unlock", CommandRequest(action="LOCK", ts=utcnow()).to_bytes())
        assert not reply.ok
        reply = _command(server, "sync", CommandRequest(correlation_id="c-4", ts=utcnow()).to_bytes())
        assert not reply.ok and "disabled" in reply.detail

        if server.client.protocol_version != 5:
            return  # a 3.1.1 broker (the embedded amqtt): the correlation_id in the JSON is the whole story
        # MQTT v5 request/response: the answer also goes to the requester's response topic.
        got: list[Message] = []
        server.client.subscribe("replies/me", got.append)
        request = CommandRequest(correlation_id="c-5", ts=utcnow()).to_bytes()
        server.client.publish(topics.command(DEVICE, "reload"), request, qos=1, response_topic="replies/me",
                              correlation_data=b"xyz")
        assert wait_until(lambda: len(got) >= 1)
        assert CommandResponse.parse(got[0].payload).correlation_id == "c-5"
        assert got[0].correlation_data == b"xyz"
    finally:
        server.close()


DEVICE_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from device.config import DeviceConfig
    from device.mqtt.service import DeviceMqtt
    config = DeviceConfig.model_validate({"device": {"id": "door-9", "site": "hq", "data_dir": sys.argv[3]},
        "mqtt": {"enabled": True, "host": sys.argv[1], "port": int(sys.argv[2]), "homeassistant": False}})
    mqtt = DeviceMqtt(config).start()
    mqtt.client.wait_connected()  # however long a busy machine takes; the test waits for this line
    print("ready", flush=True)
    time.sleep(600)
""")


def test_last_will_marks_a_killed_device_offline(mosquitto: Broker, tmp_path: Path) -> None:
    topics = Topics("facegate", SITE)
    watcher = Collector(mosquitto.host, mosquitto.port, [topics.available("door-9")], client_id="watcher")
    proc = subprocess.Popen([sys.executable, "-c", DEVICE_SCRIPT, mosquitto.host, str(mosquitto.port),
                             str(tmp_path / "d9")], stdout=subprocess.PIPE, cwd=Path(__file__).parents[1])
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        assert watcher.wait(lambda ms: [m.payload for m in ms][-1:] == [b"online"])
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        # The broker fires the will 1.5 keep-alives after the last packet: up to 45 s plus a busy machine.
        assert watcher.wait(lambda ms: [m.payload for m in ms][-1:] == [b"offline"], timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        watcher.close()
    late = Collector(mosquitto.host, mosquitto.port, [topics.available("door-9")], client_id="late")
    try:  # retained: a subscriber arriving later also sees it
        assert late.wait(lambda ms: bool(ms) and ms[-1].payload == b"offline" and ms[-1].retain)
    finally:
        late.close()
