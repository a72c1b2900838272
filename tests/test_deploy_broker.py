"""The deploy/ mosquitto config, run for real: TLS client certificates and the per-device ACL."""

from __future__ import annotations

import os
import re
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from device.protocol.topics import Topics
from server.broker import free_port, mosquitto_binary, wait_port
from tests.mqtt_kit import ACK_S

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy" / "mosquitto"
SETTLE_S = 1.0

MOSQUITTO = mosquitto_binary()
pytestmark = pytest.mark.skipif(MOSQUITTO is None, reason="needs mosquitto for deploy/'s TLS and ACL config "
                                "(apt install mosquitto; put /usr/sbin on PATH)")


class TlsBroker:
    """mosquitto started from deploy/mosquitto/mosquitto.conf with its paths pointed at a temp folder."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.certs = tmp / "certs"
        subprocess.run([str(DEPLOY / "make-certs.sh"), str(self.certs), "127.0.0.1",
                        "facegate-server", "door-1", "door-2"], check=True, capture_output=True)
        conf = (DEPLOY / "mosquitto.conf").read_text()
        conf = conf.replace("/etc/mosquitto/certs", str(self.certs))
        conf = conf.replace("/etc/mosquitto/facegate.acl", str(DEPLOY / "facegate.acl"))
        conf = conf.replace("/var/lib/mosquitto/", f"{tmp}/")
        conf = re.sub(r"^listener 8883$", f"listener {self.port} 127.0.0.1", conf, flags=re.M)
        assert f"listener {self.port}" in conf
        if os.geteuid() == 0:  # as root mosquitto drops to user 'mosquitto', who cannot read tmp_path
            conf += "\nuser root\n"
        (tmp / "mosquitto.conf").write_text(conf)
        assert MOSQUITTO is not None
        self.log = open(tmp / "mosquitto.log", "wb")
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(tmp / "mosquitto.conf")], stderr=self.log)
        assert wait_port("127.0.0.1", self.port, alive=lambda: self.proc.poll() is None), \
            f"mosquitto with the deploy config did not listen; see {tmp / 'mosquitto.log'}"

    def client(self, cn: str | None) -> mqtt.Client:
        """A connected client presenting ``cn``'s certificate (None: no certificate)."""
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{cn}-{uuid.uuid4().hex[:6]}",
                             protocol=mqtt.MQTTv311)
        context = ssl.create_default_context(cafile=str(self.certs / "ca.crt"))
        if cn is not None:
            context.load_cert_chain(self.certs / f"{cn}.crt", self.certs / f"{cn}.key")
        client.tls_set_context(context)
        client.connect("127.0.0.1", self.port, keepalive=10)
        client.loop_start()
        return client

    def close(self) -> None:
        """Stop the broker."""
        self.proc.terminate()
        self.proc.wait(5)
        self.log.close()


@pytest.fixture()
def tls_broker(tmp_path: Path) -> Iterator[TlsBroker]:
    """A TLS + ACL mosquitto from the deploy config."""
    broker = TlsBroker(tmp_path)
    try:
        yield broker
    finally:
        broker.close()


class Recorder:
    """Collects (topic, payload) of every message a client receives."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()

    def __call__(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.seen.append((msg.topic, msg.payload))

    def topics(self) -> set[str]:
        """Topics received so far."""
        with self.lock:
            return {t for t, _ in self.seen}


def _subscribe(client: mqtt.Client, topic: str, recorder: Recorder) -> None:
    client.on_message = recorder
    result, _mid = client.subscribe(topic, qos=1)
    assert result == mqtt.MQTT_ERR_SUCCESS
    time.sleep(0.3)


def test_device_cannot_publish_to_other_device_or_bundles(tls_broker: TlsBroker) -> None:
    topics = Topics("facegate", "hq")
    server = tls_broker.client("facegate-server")
    recorder = Recorder()
    _subscribe(server, "facegate/#", recorder)
    door1 = tls_broker.client("door-1")

    own = topics.events("door-1")
    forged_events = topics.events("door-2")
    forged_bundle = topics.bundle_announce
    forged_command = topics.command("door-2", "unlock")
    for topic in (own, forged_events, forged_bundle, forged_command):
        door1.publish(topic, b'{"probe": true}', qos=1).wait_for_publish(ACK_S)
    time.sleep(SETTLE_S)

    received = recorder.topics()
    assert own in received, "the device's own event must pass the ACL"
    assert forged_events not in received
    assert forged_bundle not in received
    assert forged_command not in received
    for c in (server, door1):
        c.disconnect()
        c.loop_stop()


def test_device_reads_only_its_own_commands_and_bundles(tls_broker: TlsBroker) -> None:
    topics = Topics("facegate", "hq")
    door1 = tls_broker.client("door-1")
    recorder = Recorder()
    _subscribe(door1, "facegate/#", recorder)
    server = tls_broker.client("facegate-server")
    for topic in (topics.command("door-1", "unlock"), topics.command("door-2", "unlock"),
                  topics.bundle_announce, topics.bundle_chunk(3), topics.gallery_delta,
                  topics.bundle_chunk_reply("door-1"), topics.bundle_chunk_reply("door-2"),
                  topics.events("door-2")):
        server.publish(topic, b"{}", qos=1).wait_for_publish(ACK_S)
    time.sleep(SETTLE_S)
    received = recorder.topics()
    assert topics.command("door-1", "unlock") in received
    assert topics.bundle_announce in received
    assert topics.bundle_chunk(3) in received
    assert topics.gallery_delta in received
    assert topics.bundle_chunk_reply("door-1") in received, "re-sent chunks addressed to this device"
    assert topics.bundle_chunk_reply("door-2") not in received
    assert topics.command("door-2", "unlock") not in received
    assert topics.events("door-2") not in received
    for c in (server, door1):
        c.disconnect()
        c.loop_stop()


def test_anonymous_client_is_refused(tls_broker: TlsBroker) -> None:
    with pytest.raises((ssl.SSLError, OSError, ConnectionError)):
        client = tls_broker.client(None)
        # TLS 1.3 may report the missing certificate only on the first read.
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and not client.is_connected():
            time.sleep(0.05)
        client.loop_stop()
        if not client.is_connected():
            raise ConnectionError("refused")
    plain = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    with pytest.raises((ssl.SSLError, OSError, ConnectionError)):
        plain.connect("127.0.0.1", tls_broker.port, keepalive=5)
        plain.loop(timeout=2)
        plain.loop(timeout=2)
        if not plain.is_connected():
            raise ConnectionError("refused")


def test_server_can_do_everything_it_needs(tls_broker: TlsBroker) -> None:
    topics = Topics("facegate", "hq")
    server = tls_broker.client("facegate-server")
    recorder = Recorder()
    _subscribe(server, "#", recorder)
    needed = [topics.bundle_announce, topics.bundle_chunk(1), topics.gallery_delta,
              topics.command("door-1", "unlock"), "homeassistant/lock/door-1/door/config"]
    for topic in needed:
        server.publish(topic, b"{}", qos=1).wait_for_publish(ACK_S)
    door1 = tls_broker.client("door-1")
    for topic in (topics.events("door-1"), topics.bundle_ack("door-1"), topics.bundle_chunk_request,
                  topics.available("door-1")):
        door1.publish(topic, b"{}", qos=1).wait_for_publish(ACK_S)
        needed.append(topic)
    time.sleep(SETTLE_S)
    assert set(needed) <= recorder.topics()
    for c in (server, door1):
        c.disconnect()
        c.loop_stop()
