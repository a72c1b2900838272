"""Hypothesis-fuzzed payloads on every topic the device and the server subscribe to, over real mosquitto:
random bytes, wrong JSON types, huge strings, deep nesting, corrupted chunk frames. Nothing crashes,
no handler lets an exception escape into the logs, and afterwards the device still answers commands
and still installs a good bundle."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.protocol.chunks import MAGIC
from core.protocol.schemas import CommandRequest, utcnow
from core.protocol.topics import HA_STATUS_TOPIC
from device.config import BundleConfig, DeviceConfig
from device.mqtt.service import DeviceMqtt
from server.bundles.builder import BuiltBundle
from tests.bundle_kit import TOPICS, Device, Server, build, serving
from tests.conftest import Broker
from tests.mqtt_kit import ACK_S, CONNECT_S, Collector, keypair, wait_until
from tests.test_mqtt_service import DoorAgent

DEVICE = "door-1"
FUZZ_EXAMPLES = 150

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                      st.text(max_size=50))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)), max_leaves=20)
FIELDS = ["schema_version", "manifest", "signature", "sequence", "seq", "add", "remove", "model_sha256",
          "correlation_id", "seconds", "action", "chunks", "device", "files", "chunk_size", "created"]


@st.composite
def wrong_types(draw: st.DrawFn) -> bytes:
    """A JSON object with our field names and values of the wrong type."""
    keys = draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=6, unique=True))
    obj = {k: draw(json_value) for k in keys}
    if draw(st.booleans()):
        obj["schema_version"] = 1
    return json.dumps(obj).encode()


@st.composite
def chunk_frames(draw: st.DrawFn) -> bytes:
    """Frames with the right magic and a garbage (or plausible) header."""
    header = draw(st.one_of(st.binary(max_size=64), wrong_types()))
    length = draw(st.one_of(st.just(len(header)), st.integers(0, 1 << 32 - 1)))
    return MAGIC + (length % (1 << 32)).to_bytes(4, "big") + header + draw(st.binary(max_size=64))


payloads = st.one_of(
    st.binary(max_size=512),
    wrong_types(),
    json_value.map(lambda v: json.dumps(v).encode()),
    st.integers(1, 3).map(lambda n: b'{"schema_version": 1, "name": "' + b"x" * (n << 20) + b'"}'),
    st.integers(100, 200_000).map(lambda depth: b"[" * depth + b"]" * depth),
    st.integers(100, 50_000).map(lambda depth: b'{"a":' * depth + b"1" + b"}" * depth),
    chunk_frames(),
    st.sampled_from([b"", b"online", b"offline", b"null", b"{}", b"[]", b'"x"', b"\x00" * 16]),
)


@dataclass
class Fleet:
    """A device with its MQTT side and bundle updater, the server side, and a fuzzing publisher."""

    device: DeviceMqtt
    bundles: Device
    server: Server
    fuzzer: Collector
    responses: Collector
    good: BuiltBundle
    topics: list[str]


@pytest.fixture()
def fleet(mosquitto: Broker, tmp_path: Path) -> Iterator[Fleet]:
    private, public = keypair()
    server = Server(mosquitto.host, mosquitto.port, tmp_path / "bundles")
    bundles = Device(mosquitto.host, mosquitto.port, DEVICE, tmp_path / "dev", public,
                     config=BundleConfig(request_idle_s=0.5))
    server.bundles.publish(build(tmp_path, private, 1))
    bundles.wait(lambda a: a.running_sequence == 1)
    agent = DoorAgent()
    config = DeviceConfig.model_validate({
        "device": {"id": DEVICE, "site": TOPICS.site, "data_dir": str(tmp_path / "dev")},
        "mqtt": {"enabled": True, "host": mosquitto.host, "port": mosquitto.port}})
    device = DeviceMqtt(config, agent).start()
    device.attach_updater(bundles.updater)
    assert device.client.wait_connected(CONNECT_S)
    fuzzer = Collector(mosquitto.host, mosquitto.port, [], client_id="fuzzer")
    responses = Collector(mosquitto.host, mosquitto.port, [f"{TOPICS.device(DEVICE)}/cmd/+/response"],
                          client_id="responses")
    topics = [
        TOPICS.command(DEVICE, "unlock"), TOPICS.command(DEVICE, "reload"), TOPICS.command(DEVICE, "sync"),
        TOPICS.command(DEVICE, "x"), HA_STATUS_TOPIC, TOPICS.bundle_announce, TOPICS.bundle_chunk(1),
        TOPICS.bundle_chunk(2), TOPICS.bundle_chunk_reply(DEVICE), TOPICS.gallery_delta,
        TOPICS.bundle_request(DEVICE), TOPICS.bundle_ack("door-2"), TOPICS.available("door-2"),
    ]
    yield Fleet(device, bundles, server, fuzzer, responses, build(tmp_path, private, 2, tag="m2"), topics)
    for closer in (fuzzer.close, responses.close, device.close, bundles.close, server.close,
                   agent.door.close):
        closer()


def _settle(fleet: Fleet, marker: str) -> None:
    """Wait until the device has worked through everything sent so far (a command round trip)."""
    before = len(fleet.responses.messages)
    request = CommandRequest(correlation_id=marker, ts=utcnow()).to_bytes()
    fleet.fuzzer.client.publish(TOPICS.command(DEVICE, "reload"), request, qos=1).wait_for_publish(ACK_S)
    assert fleet.responses.wait(lambda ms: any(b'"' + marker.encode() + b'"' in m.payload
                                               for m in ms[before:]))
    assert wait_until(lambda: fleet.bundles.updater._queue.empty(),
                      progress=lambda: fleet.bundles.updater._queue.qsize())


def test_fuzzed_payloads_never_crash_anything(fleet: Fleet, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    published: list[int] = []

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                     HealthCheck.data_too_large, HealthCheck.large_base_example])
    @given(topic=st.sampled_from(fleet.topics), payload=payloads, retain=st.booleans())
    def fuzz(topic: str, payload: bytes, retain: bool) -> None:
        # A broker may drop the fuzzer's connection over garbage; the fuzzer reconnects and sends again.
        client = fleet.fuzzer.client
        for _ in range(3):
            assert client.wait_connected(CONNECT_S)
            if client.publish(topic, payload, qos=1, retain=retain and "bundles/" not in topic) \
                    .wait_for_publish(ACK_S):
                published.append(len(payload))
                return
        raise AssertionError(f"the broker refused a {len(payload)}-byte message on {topic} three times")

    fuzz()
    _settle(fleet, "after-fuzz")
    print(f"published {len(published)} fuzzed messages, {sum(published) / 1e6:.1f} MB, across "
          f"{len(fleet.topics)} topics")
    unhandled = [r for r in caplog.records if r.exc_info or "raised" in r.getMessage()
                 or "failed on" in r.getMessage() or "dispatch" in r.getMessage()]
    assert not unhandled, [f"{r.name}: {r.getMessage()}" for r in unhandled]
    handled = {r.name for r in caplog.records if r.levelno >= logging.WARNING}
    print(f"handled-and-logged rejections from: {sorted(handled)}")
    assert {"device.bundles.updater", "device.mqtt.service"} <= handled  # the garbage reached the handlers
    assert fleet.device.client.connected and fleet.bundles.client.connected
    assert fleet.bundles.updater._thread.is_alive() and fleet.server.bundles._thread.is_alive()

    # Still fully working: a good bundle installs and the door answers.
    fleet.server.bundles.publish(fleet.good)
    fleet.bundles.wait(lambda a: a.running_sequence == 2)
    assert serving(fleet.bundles.store).sequence == 2
    _settle(fleet, "after-bundle")
