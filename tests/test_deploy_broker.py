"""The deploy/ mosquitto config, run for real: TLS client certificates and the per-device ACL."""

from __future__ import annotations

import os
import re
import ssl
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from core.protocol.topics import Topics
from server.broker import free_port, mosquitto_binary, wait_port
from tests.mqtt_kit import ACK_S, wait_until

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy" / "mosquitto"

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
                        "facegate-server", "door-1", "door-2", "homeassistant"],
                       check=True, capture_output=True)
        conf = (DEPLOY / "mosquitto.conf").read_text()
        conf = conf.replace("/etc/mosquitto/certs", str(self.certs))
        conf = conf.replace("/etc/mosquitto/facegate.acl", str(DEPLOY / "facegate.acl"))
        conf = conf.replace("/var/lib/mosquitto/", f"{tmp}/")
        conf = re.sub(r"^listener 8883$", f"listener {self.port} 127.0.0.1", conf, flags=re.M)
        assert f"listener {self.port}" in conf
        if os.geteuid() == 0:  # as root mosquitto drops to user 'mosquitto', who cannot read tmp_path
            conf += "\nuser root\n"
        assert str(self.certs / "crl.pem") in conf, "the deploy config checks the CRL"
        (tmp / "mosquitto.conf").write_text(conf)
        self.log = open(tmp / "mosquitto.log", "wb")
        self.start()

    def start(self) -> None:
        """Start mosquitto on the same port (after ``stop``) and wait until it listens."""
        assert MOSQUITTO is not None
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.tmp / "mosquitto.conf")], stderr=self.log)
        assert wait_port("127.0.0.1", self.port, alive=lambda: self.proc.poll() is None), \
            f"mosquitto with the deploy config did not listen; see {self.tmp / 'mosquitto.log'}"

    def stop(self) -> None:
        """Stop mosquitto (it keeps its persistence file and port for ``start``)."""
        self.proc.terminate()
        self.proc.wait(5)

    def restart(self) -> None:
        """Stop and start the broker (it reads the CRL at start)."""
        self.stop()
        self.start()

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
        if self.proc.poll() is None:
            self.stop()
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

    def got(self, topic: str, payload: bytes) -> bool:
        """True once ``payload`` arrived on ``topic``."""
        with self.lock:
            return (topic, payload) in self.seen


def _subscribe(client: mqtt.Client, topic: str, recorder: Recorder) -> None:
    """Subscribe and wait for the broker's SUBACK (no fixed settling time)."""
    granted = threading.Event()
    client.on_subscribe = lambda *_args: granted.set()
    client.on_message = recorder
    result, _mid = client.subscribe(topic, qos=1)
    assert result == mqtt.MQTT_ERR_SUCCESS
    assert granted.wait(ACK_S), f"no SUBACK for {topic}"


def _fence(sender: mqtt.Client, topic: str, recorder: Recorder) -> None:
    """Publish a marker on an allowed ``topic`` and wait for it: the broker keeps one sender's order, so
    every earlier message from ``sender`` that was going to arrive has arrived."""
    marker = f"fence-{uuid.uuid4().hex}".encode()
    sender.publish(topic, marker, qos=1).wait_for_publish(ACK_S)
    assert wait_until(lambda: recorder.got(topic, marker)), f"the fence on {topic} never arrived"


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
    _fence(door1, own, recorder)

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
                  topics.events_confirm("door-1"), topics.events_confirm("door-2"), topics.events("door-2")):
        server.publish(topic, b"{}", qos=1).wait_for_publish(ACK_S)
    _fence(server, topics.command("door-1", "unlock"), recorder)
    received = recorder.topics()
    assert topics.command("door-1", "unlock") in received
    assert topics.bundle_announce in received
    assert topics.bundle_chunk(3) in received
    assert topics.gallery_delta in received
    assert topics.bundle_chunk_reply("door-1") in received, "re-sent chunks addressed to this device"
    assert topics.bundle_chunk_reply("door-2") not in received
    assert topics.events_confirm("door-1") in received, "the server's receipts for this device's events"
    assert topics.events_confirm("door-2") not in received
    assert topics.command("door-2", "unlock") not in received
    assert topics.events("door-2") not in received
    for c in (server, door1):
        c.disconnect()
        c.loop_stop()


def _admitted(port: int, context: ssl.SSLContext | None) -> bool:
    """Whether the broker lets this client in: waits for the verdict (a CONNACK, or the connection
    closed), not for a fixed time, so a slow machine cannot turn a late "yes" into a "no"."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"probe-{uuid.uuid4().hex[:6]}",
                         protocol=mqtt.MQTTv311)
    verdict: list[bool] = []
    decided = threading.Event()

    def on_connect(_c: mqtt.Client, _u: object, _f: object, reason: object, _p: object) -> None:
        verdict.append(not getattr(reason, "is_failure", True))
        decided.set()

    def on_closed(*_args: object) -> None:
        verdict.append(False)
        decided.set()

    client.on_connect = on_connect
    client.on_disconnect = on_closed
    client.on_connect_fail = on_closed
    if context is not None:
        client.tls_set_context(context)
    try:
        client.connect("127.0.0.1", port, keepalive=10)
    except (ssl.SSLError, OSError):
        return False  # refused during the TLS handshake
    client.loop_start()
    try:
        assert decided.wait(ACK_S), "the broker neither admitted nor refused the client"
        return verdict[0]
    finally:
        client.disconnect()
        client.loop_stop()


def test_anonymous_client_is_refused(tls_broker: TlsBroker) -> None:
    # No client certificate (TLS 1.3 may report it only on the first read, as a closed connection).
    assert not _admitted(tls_broker.port, ssl.create_default_context(cafile=str(tls_broker.certs / "ca.crt")))
    assert not _admitted(tls_broker.port, None)  # plain MQTT on the TLS listener
    with_cert = ssl.create_default_context(cafile=str(tls_broker.certs / "ca.crt"))
    with_cert.load_cert_chain(tls_broker.certs / "door-1.crt", tls_broker.certs / "door-1.key")
    assert _admitted(tls_broker.port, with_cert)  # the probe itself can say yes


def test_server_can_do_everything_it_needs(tls_broker: TlsBroker) -> None:
    topics = Topics("facegate", "hq")
    server = tls_broker.client("facegate-server")
    recorder = Recorder()
    _subscribe(server, "#", recorder)
    needed = [topics.bundle_announce, topics.bundle_chunk(1), topics.gallery_delta,
              topics.command("door-1", "unlock"), topics.events_confirm("door-1"),
              "homeassistant/lock/door-1/door/config"]
    for topic in needed:
        server.publish(topic, b"{}", qos=1).wait_for_publish(ACK_S)
    door1 = tls_broker.client("door-1")
    for topic in (topics.events("door-1"), topics.bundle_ack("door-1"), topics.bundle_request("door-1"),
                  topics.available("door-1")):
        door1.publish(topic, b"{}", qos=1).wait_for_publish(ACK_S)
        needed.append(topic)
    assert wait_until(lambda: set(needed) <= recorder.topics()), set(needed) - recorder.topics()
    for c in (server, door1):
        c.disconnect()
        c.loop_stop()


def _context(broker: TlsBroker, cn: str) -> ssl.SSLContext:
    """A TLS client context presenting ``cn``'s certificate."""
    context = ssl.create_default_context(cafile=str(broker.certs / "ca.crt"))
    context.load_cert_chain(broker.certs / f"{cn}.crt", broker.certs / f"{cn}.key")
    return context


def test_revoke_door_is_refused_by_the_broker(tls_broker: TlsBroker) -> None:
    """make-certs.sh revoke NAME + the deploy config's crlfile: the revoked door cannot connect."""
    assert _admitted(tls_broker.port, _context(tls_broker, "door-2"))
    subprocess.run([str(DEPLOY / "make-certs.sh"), "revoke", "door-2", str(tls_broker.certs)],
                   check=True, capture_output=True)
    tls_broker.restart()
    assert not _admitted(tls_broker.port, _context(tls_broker, "door-2")), "a revoked door was admitted"
    assert _admitted(tls_broker.port, _context(tls_broker, "door-1")), "revocation refused another door"


def test_revoke_certificates_last_at_most_a_year(tmp_path: Path) -> None:
    """Door certificates are issued for at most 365 days, and a longer lifetime is refused."""
    out = tmp_path / "certs"
    subprocess.run([str(DEPLOY / "make-certs.sh"), str(out), "127.0.0.1", "door-1"],
                   check=True, capture_output=True)
    for name in ("door-1", "server"):
        end = subprocess.run(["openssl", "x509", "-in", str(out / f"{name}.crt"), "-noout", "-checkend",
                              str(366 * 86400)], capture_output=True, check=False)
        assert end.returncode != 0, f"{name}.crt is valid for more than a year"
    longer = subprocess.run([str(DEPLOY / "make-certs.sh"), str(out), "127.0.0.1", "door-9"],
                            capture_output=True, check=False, env={**os.environ, "FACEGATE_CERT_DAYS": "825"})
    assert longer.returncode != 0 and not (out / "door-9.crt").exists()


def test_hostile_home_assistant_reads_only_status_available_events(tls_broker: TlsBroker) -> None:
    """HA never sees the gallery deltas, bundles, snapshots or another client's commands."""
    topics = Topics("facegate", "hq")
    ha = tls_broker.client("homeassistant")
    recorder = Recorder()
    _subscribe(ha, "facegate/#", recorder)
    server = tls_broker.client("facegate-server")
    allowed = {topics.status("door-1"), topics.available("door-1"), topics.events("door-2")}
    hidden = {topics.gallery_delta, topics.bundle_announce, topics.bundle_chunk(1),
              topics.bundle_chunk_reply("door-1"), topics.snapshot("door-1"),
              topics.command("door-1", "unlock"), topics.events_confirm("door-1"),
              topics.bundle_chunk_reply("homeassistant"), Topics("facegate", "other").status("door-1")}
    for topic in sorted(hidden) + sorted(allowed):
        server.publish(topic, b"{}", qos=1).wait_for_publish(ACK_S)
    _fence(server, topics.status("door-1"), recorder)
    received = recorder.topics()
    assert allowed <= received, allowed - received
    assert not hidden & received, hidden & received
    for c in (server, ha):
        c.disconnect()
        c.loop_stop()


def test_hostile_home_assistant_commands_only_listed_doors(tls_broker: TlsBroker) -> None:
    """HA may unlock door-1 (listed in the ACL) and no other door, at no other site."""
    topics = Topics("facegate", "hq")
    server = tls_broker.client("facegate-server")
    recorder = Recorder()
    _subscribe(server, "facegate/#", recorder)
    ha = tls_broker.client("homeassistant")
    refused = [topics.command("door-2", "unlock"), Topics("facegate", "other").command("door-1", "unlock")]
    for topic in refused:
        ha.publish(topic, b"{}", qos=1).wait_for_publish(ACK_S)
    _fence(ha, topics.command("door-1", "unlock"), recorder)
    assert not set(refused) & recorder.topics()
    for c in (server, ha):
        c.disconnect()
        c.loop_stop()


def test_hostile_door_is_bound_to_its_site(tls_broker: TlsBroker) -> None:
    """A door reads no other site's bundles and publishes nothing under another site."""
    hq, other = Topics("facegate", "hq"), Topics("facegate", "other")
    server = tls_broker.client("facegate-server")
    door1 = tls_broker.client("door-1")
    door_seen, server_seen = Recorder(), Recorder()
    _subscribe(door1, "facegate/#", door_seen)
    _subscribe(server, "facegate/#", server_seen)
    for topic in (other.bundle_announce, other.gallery_delta, other.bundle_chunk(1)):
        server.publish(topic, b"{}", qos=1).wait_for_publish(ACK_S)
    _fence(server, hq.bundle_announce, door_seen)
    assert not {other.bundle_announce, other.gallery_delta, other.bundle_chunk(1)} & door_seen.topics()
    for topic in (other.events("door-1"), other.bundle_request("door-1"), hq.bundle_request("door-2")):
        door1.publish(topic, b"{}", qos=1).wait_for_publish(ACK_S)
    _fence(door1, hq.events("door-1"), server_seen)
    assert not {other.events("door-1"), other.bundle_request("door-1"),
                hq.bundle_request("door-2")} & server_seen.topics()
    for c in (server, door1):
        c.disconnect()
        c.loop_stop()
