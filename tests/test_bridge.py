"""A site mosquitto bridged to the central one (server/bridge.py, deploy/mosquitto/bridge-site.conf.example),
run for real: the doors on the site broker, the server on the central broker.

- The doors are the device's own MQTT side, wired as ``device/agent/compose.py`` wires it (no camera):
  ``DeviceMqtt`` with its outbox and event receipts, and the ``BundleUpdater`` with its bundle store.
- The server is the app with MQTT on (``tests/server_support.connected_server``): audit subscriber,
  receipts, gallery deltas, the bundle server, deletion confirmation.
- Events, a signed bundle, gallery deltas and acks cross the bridge. Then the WAN link is cut (or the
  central broker stops) while the doors keep deciding and the server deletes a person; once it is back,
  every event is stored exactly once, every outbox is empty, the removal is applied at every door and
  its ack reached the server (the deletion is confirmed).
- Plain TCP, and once with the deploy TLS + ACL config at the central broker and the site's bridge
  certificate (``make-certs.sh bridge SITE``); the bridge user cannot leave its site.
- A site queue (``max_queued_messages``) far too small for the outage drops events at the broker; the
  doors' outboxes deliver them anyway, exactly once.

mosquitto only: the embedded amqtt broker cannot bridge, so these tests skip without mosquitto (they never
use the ``mosquitto`` fixture, whose fallback is amqtt). The phases follow progress, not the clock.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from sqlalchemy import select

from core.mqtt.client import Message
from core.protocol.schemas import BundleAck
from core.protocol.topics import Topics
from core.types import Decision, DecisionKind, LivenessResult
from device.bundles.updater import BundleUpdater
from device.config import DeviceConfig, GalleryConfig
from device.gallery import Gallery
from device.mqtt.runtime import open_store
from device.mqtt.service import DeviceMqtt
from models.runtime.manifest import load_manifest, save_manifest
from server.bridge import BridgeTls, bridge_acl, bridge_conf, bridge_config, bridge_user
from server.broker import LocalBroker, free_port, mosquitto_binary
from server.bundles.builder import load_bundle
from server.bundles.gallery_bundle import build_gallery_bundle
from server.db.models import AuditEntry, BundleAckRow, Device, EventRow
from server.registry.model_folder import embedder_entry_name
from server.registry.promotion import PromotionContext
from tests.mqtt_kit import ACK_S, Collector, make_models_dir, sha_tag
from tests.server_support import PREFIX, connected_server, login, state_of, wait_until
from tests.test_delta_rebase import _enroll
from tests.test_deploy_broker import DEPLOY, Recorder, TlsBroker, _fence, _subscribe

needs_mosquitto = pytest.mark.skipif(
    mosquitto_binary() is None,
    reason="a bridge needs mosquitto (amqtt cannot bridge): apt install mosquitto; put /usr/sbin on PATH")

SITE = "branch"  # the site the deploy examples bridge (facegate.acl has its bridge block)
TOPICS = Topics(PREFIX, SITE)
DOORS = ("door-1", "door-2")
# Decisions per door before the outage (stored at once), during it (queued), and after it.
BEFORE, DURING, AFTER = 10, 30, 5
# The bridge's reconnect backoff, short for the test (the product default is 5..60 s).
TEST_RESTART_S = (1, 2)
RELAY_BUFFER = 65536
# The site broker's queue for the bridge in the overflow test: far below what one outage produces.
SMALL_QUEUE = 5


class Link:
    """The WAN between the site and the central broker: a TCP relay that can be cut and restored."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._listener.settimeout(0.2)
        self._up = threading.Event()
        self._up.set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.connections = 0
        self._thread = threading.Thread(target=self._accept, name="link", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                near, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if not self._up.is_set():
                near.close()
                continue
            try:
                far = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:  # the central broker is down: the bridge retries
                near.close()
                continue
            far.settimeout(None)
            with self._lock:
                self._sockets += [near, far]
                self.connections += 1
            for src, dst in ((near, far), (far, near)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(RELAY_BUFFER):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Drop every connection and refuse new ones."""
        self._up.clear()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def restore(self) -> None:
        """Relay new connections again."""
        self._up.set()

    def close(self) -> None:
        """Cut and stop listening."""
        self.cut()
        self._stop.set()
        self._listener.close()
        self._thread.join(timeout=5)


@dataclass
class Central:
    """The central broker as the test drives it: stop/start, and what the server and the bridge need."""

    port: int
    stop: Callable[[], None]
    start: Callable[[], object]
    server_mqtt: dict[str, Any] = field(default_factory=dict)
    tls: BridgeTls | None = None


@contextlib.contextmanager
def central_broker(tmp_path: Path, transport: str) -> Iterator[Central]:
    """A plain mosquitto, or one run from deploy/mosquitto (TLS, client certificates, the ACL)."""
    if transport == "plain":
        broker = LocalBroker(data_dir=tmp_path / "central", prefer="mosquitto").start()
        try:
            yield Central(broker.port, broker.stop, broker.start)
        finally:
            broker.close()
        return
    tls_broker = TlsBroker(tmp_path / "central")
    try:
        certs = tls_broker.certs
        subprocess.run([str(DEPLOY / "make-certs.sh"), "bridge", SITE, str(certs)], check=True,
                       capture_output=True)
        user = bridge_user(SITE)
        yield Central(tls_broker.port, tls_broker.stop, tls_broker.start,
                      {"tls": True, "ca_file": str(certs / "ca.crt"),
                       "cert_file": str(certs / "facegate-server.crt"),
                       "key_file": str(certs / "facegate-server.key")},
                      BridgeTls(certs / "ca.crt", certs / f"{user}.crt", certs / f"{user}.key"))
    finally:
        tls_broker.close()


class BridgedDoor:
    """A door's MQTT side as device/agent/compose.py wires it: DeviceMqtt (outbox, receipts, status) and
    the BundleUpdater on the same client, connected to the site broker."""

    def __init__(self, device_id: str, port: int, data_dir: Path, public_key: str) -> None:
        self.device_id = device_id
        self.config = DeviceConfig.model_validate({
            "device": {"id": device_id, "site": SITE, "data_dir": str(data_dir)},
            "mqtt": {"enabled": True, "host": "127.0.0.1", "port": port, "homeassistant": False},
            "bundle": {"public_key": public_key, "request_idle_s": 0.5},
        })
        store = open_store(self.config)
        assert store is not None
        store.recover()
        self.store = store
        self.mqtt = DeviceMqtt(self.config)
        self.updater = BundleUpdater(self.mqtt.client, self.mqtt.topics, device_id, store, self.config.bundle)
        self.mqtt.attach_updater(self.updater)
        self.mqtt.start()
        self.updater.start()
        self.decided = 0

    def decide(self, count: int) -> None:
        """``count`` decisions through the real event sink (outbox first, then MQTT)."""
        for _ in range(count):
            self.mqtt.sink.emit(Decision(DecisionKind.GRANTED, f"p{self.decided}", "Ada", 0.8, 0.2,
                                         LivenessResult.skipped(), {"detect": 1.0}))
            self.decided += 1

    def wait_ack(self, predicate: Callable[[BundleAck], bool], what: str) -> None:
        """Wait until the door's own last ack satisfies ``predicate``."""
        wait_until(lambda: predicate(self.updater.last_ack), f"{self.device_id}: {what}",
                   progress=lambda: self.updater.last_ack.model_dump_json())

    def wait_outbox_empty(self, what: str) -> None:
        """Wait until the server's receipts emptied the door's outbox."""
        wait_until(lambda: self.mqtt.outbox.depth == 0, f"{self.device_id}: {what}",
                   progress=lambda: self.mqtt.outbox.depth)

    def persons(self) -> set[str]:
        """Person ids in the door's live (working) gallery."""
        active = self.store.active()
        assert active is not None
        gallery = Gallery.open(active.working_gallery, active.manifest.embedder_sha256, GalleryConfig())
        try:
            return set(gallery.persons())
        finally:
            gallery.close()

    def close(self) -> None:
        """Stop like the agent does."""
        self.updater.close()
        self.mqtt.close()


def _models(tmp_path: Path, client: TestClient) -> tuple[Path, str]:
    """A real (tiny) models folder whose embedder entry has the name the server config expects."""
    folder, sha = make_models_dir(tmp_path / "models", sha_tag("bridge"))
    manifest = load_manifest(folder)
    name = embedder_entry_name(state_of(client).config)
    save_manifest(folder, manifest.model_copy(update={"models": [
        e.model_copy(update={"name": name}) for e in manifest.models]}))
    return folder, sha


def _stored(client: TestClient) -> list[tuple[str, int, str]]:
    """(device, seq, event id) of every stored event."""
    with state_of(client).db.session() as session:
        return [(r.device_id, int(r.payload["seq"]), r.event_id) for r in session.scalars(select(EventRow))]


def _online(client: TestClient) -> bool:
    """Whether the server saw every door come online."""
    with state_of(client).db.session() as session:
        rows = {d.device_id: d.available for d in session.scalars(select(Device))}
    return all(rows.get(door) == "online" for door in DOORS)


def _acked(client: TestClient, kind: str, sequence: int, state: str) -> bool:
    """Whether the server stored every door's ack of bundle/delta ``sequence`` in ``state``."""
    with state_of(client).db.session() as session:
        acks = session.scalars(select(BundleAckRow.device_id).where(
            BundleAckRow.kind == kind, BundleAckRow.sequence == sequence, BundleAckRow.state == state))
        return set(acks) >= set(DOORS)


def _seqs(collector: Collector, device_id: str) -> set[int]:
    """The event sequence numbers ``collector`` saw from ``device_id``."""
    return {int(json.loads(m.payload)["seq"]) for m in collector.on_topic(TOPICS.events(device_id))}


def _wait_at_site(collector: Collector, device_id: str, count: int) -> None:
    """Wait until the site broker delivered ``count`` distinct events of ``device_id``."""
    wait_until(lambda: len(_seqs(collector, device_id)) == count, f"{device_id}'s events at the site broker",
               progress=lambda: len(_seqs(collector, device_id)))


def _delta(seq: int) -> Callable[[BundleAck], bool]:
    return lambda ack: ack.delta_sequence == seq and ack.delta_state == "applied"


def _bridge_is(state: bytes) -> Callable[[list[Message]], bool]:
    """The last bridge notification says ``state``."""
    return lambda messages: bool(messages) and messages[-1].payload == state


@dataclass
class Rig:
    """A central broker, the WAN link, a bridged site broker, the server and the doors."""

    central: Central
    link: Link
    site: LocalBroker
    site_events: Collector  # every event the site broker delivers (a subscriber at the site)
    bridge_state: Collector  # the bridge's notifications at the site: 1 up, 0 down
    client: TestClient
    doors: list[BridgedDoor]


@contextlib.contextmanager
def bridged_site(tmp_path: Path, transport: str, site_config: str = "") -> Iterator[Rig]:
    """Start the central broker, the link, the site broker bridged over it (``site_config``: more
    mosquitto lines for it), the server at the central broker and the doors at the site."""
    with contextlib.ExitStack() as stack:
        central = stack.enter_context(central_broker(tmp_path, transport))
        link = Link(central.port)
        stack.callback(link.close)
        stanza = bridge_conf(TOPICS, f"127.0.0.1:{link.port}", central.tls, restart_s=TEST_RESTART_S)
        site = LocalBroker(data_dir=tmp_path / "site", prefer="mosquitto",
                           extra_config=site_config + stanza)
        stack.enter_context(site)
        bridge = Collector(site.host, site.port, [TOPICS.bridge_state], client_id="bridge-watch")
        stack.callback(bridge.close)
        assert bridge.wait(_bridge_is(b"1")), "the bridge never came up"
        site_events = Collector(site.host, site.port, [TOPICS.all_events], client_id="site-events")
        stack.callback(site_events.close)
        client = stack.enter_context(connected_server(tmp_path, "127.0.0.1", central.port, site=SITE,
                                                      **central.server_mqtt))
        public = state_of(client).config.signing_key_path.with_name("bundle.key.pub").read_text().strip()
        doors = []
        for name in DOORS:
            doors.append(BridgedDoor(name, site.port, tmp_path / name, public))
            stack.callback(doors[-1].close)
        wait_until(lambda: _online(client), "both doors online")
        yield Rig(central, link, site, site_events, bridge, client, doors)


@needs_mosquitto
@pytest.mark.parametrize(("transport", "outage"), [("plain", "link-cut"), ("plain", "central-restart"),
                                                   ("tls", "link-cut")])
def test_bridge_carries_events_bundles_deltas_and_acks_across_an_outage(
        tmp_path: Path, transport: str, outage: str) -> None:
    with bridged_site(tmp_path, transport) as rig:
        central, link, site_events, client, doors = rig.central, rig.link, rig.site_events, rig.client, \
            rig.doors
        state = state_of(client)
        folder, sha = _models(tmp_path, client)

        # Up: the doors announced themselves; a bundle and a delta go in, their acks come out.
        ada = _enroll(client, sha, "Ada", seed=1)
        built = build_gallery_bundle(PromotionContext.for_state(state), folder)
        assert state.bundles is not None
        state.bundles.publish(load_bundle(Path(built["path"])))
        for door in doors:
            door.wait_ack(lambda ack: ack.running_sequence == 1, "bundle 1 installed")
        wait_until(lambda: _acked(client, "bundle", 1, "installed"), "bundle 1 acks")
        bea = _enroll(client, sha, "Bea", seed=2)
        seq_add = state.sync.ledger.seq  # type: ignore[attr-defined]
        for door in doors:
            door.wait_ack(_delta(seq_add), f"delta {seq_add} applied")
            assert {ada, bea} <= door.persons()
        wait_until(lambda: _acked(client, "delta", seq_add, "applied"), "delta acks")
        for door in doors:
            door.decide(BEFORE)
        wait_until(lambda: len(_stored(client)) == BEFORE * len(DOORS), "events before the outage",
                   progress=lambda: len(_stored(client)))
        for door in doors:  # the receipts came back through the bridge
            door.wait_outbox_empty("the receipts")

        # Down: the doors keep deciding, the server deletes Bea.
        if outage == "link-cut":
            link.cut()
        else:
            central.stop()
        assert rig.bridge_state.wait(_bridge_is(b"0")), "the site never noticed the bridge was down"
        for door in doors:
            door.decide(DURING)
        deleted = client.delete(f"/api/persons/{bea}?wait_s=0", headers=login(client))
        assert deleted.status_code == 202 and deleted.json()["status"] == "pending", deleted.text
        seq_remove = int(deleted.json()["delta_sequence"])
        for door in doors:  # the site broker has them; the doors keep them until the server's receipt
            _wait_at_site(site_events, door.device_id, BEFORE + DURING)
            assert door.mqtt.outbox.depth == DURING
        assert len(_stored(client)) == BEFORE * len(DOORS), "an event crossed a cut bridge"
        assert all(door.updater.delta_sequence == seq_add for door in doors), "a delta crossed a cut bridge"

        # Back: everything queued on either side arrives, once.
        if outage == "link-cut":
            link.restore()
        else:
            central.start()
        assert rig.bridge_state.wait(_bridge_is(b"1")), "the bridge never came back"
        for door in doors:
            door.decide(AFTER)
        total = BEFORE + DURING + AFTER
        wait_until(lambda: len(_stored(client)) >= total * len(DOORS), "every event stored",
                   progress=lambda: len(_stored(client)))
        for door in doors:
            door.wait_outbox_empty("the outbox emptied")
            door.wait_ack(_delta(seq_remove), f"removal {seq_remove} applied")
            assert door.persons() == {ada}
        wait_until(lambda: _acked(client, "delta", seq_remove, "applied"), "removal acks")
        headers = login(client)
        wait_until(lambda: client.get(f"/api/deletions/{deleted.json()['id']}", headers=headers)
                   .json()["status"] == "confirmed", "the deletion confirmed by both doors")
        rows = _stored(client)
        with state.db.session() as session:
            detail = session.scalars(select(AuditEntry.detail).where(AuditEntry.person_id == bea)
                                     .order_by(AuditEntry.id.desc())).first()
        audit = state.audit
        assert audit is not None
        print(f"{transport}/{outage}: {len(DOORS)} doors x {total} events ({DURING} each during the outage), "
              f"stored {len(rows)}; {audit.stats.duplicates} duplicates absorbed, "
              f"{sum(d.mqtt.sink.publisher.resent for d in doors)} re-sent for want of a receipt; "
              f"{link.connections} bridge connections")

    for name in DOORS:  # every event exactly once, in outbox order
        assert sorted(seq for device, seq, _ in rows if device == name) == list(range(1, total + 1)), name
    assert len(rows) == len({event_id for _, _, event_id in rows}) == total * len(DOORS)
    assert detail == f"deleted; confirmed by devices {', '.join(DOORS)}"


@needs_mosquitto
def test_bridge_queue_overflow_at_the_site_loses_no_event(tmp_path: Path) -> None:
    """A site broker whose queue for the bridge (max_queued_messages) is far smaller than an outage drops
    what does not fit; the doors' outboxes send it again once the server's receipts come back."""
    with bridged_site(tmp_path, "plain", f"max_queued_messages {SMALL_QUEUE}\n") as rig:
        rig.link.cut()
        for door in rig.doors:
            door.decide(DURING)
        for door in rig.doors:
            _wait_at_site(rig.site_events, door.device_id, DURING)
        rig.link.restore()
        for door in rig.doors:
            door.decide(AFTER)
        total = DURING + AFTER
        wait_until(lambda: len(_stored(rig.client)) >= total * len(DOORS), "every event stored",
                   progress=lambda: len(_stored(rig.client)))
        for door in rig.doors:
            door.wait_outbox_empty("the outbox emptied")
        rows = _stored(rig.client)
        resent = sum(door.mqtt.sink.publisher.resent for door in rig.doors)
        print(f"queue {SMALL_QUEUE}: {len(DOORS)} doors x {DURING} events during the outage + {AFTER} after, "
              f"stored {len(rows)}, {resent} re-sent by the doors")
    for name in DOORS:
        assert sorted(seq for device, seq, _ in rows if device == name) == list(range(1, total + 1)), name
    assert len(rows) == len({event_id for _, _, event_id in rows}) == total * len(DOORS)
    assert resent >= len(DOORS) * DURING - SMALL_QUEUE, "the bound dropped nothing: it was not applied"


@needs_mosquitto
def test_bridge_user_is_bound_to_its_site(tmp_path: Path) -> None:
    """At the central broker (deploy TLS + ACL) the bridge certificate writes and reads its own site
    only: no other site's events, no forged bundle, delta, receipt or command, no other site's deltas."""
    broker = TlsBroker(tmp_path)
    try:
        subprocess.run([str(DEPLOY / "make-certs.sh"), "bridge", SITE, str(broker.certs)], check=True,
                       capture_output=True)
        hq = Topics(PREFIX, "hq")
        server, bridge = broker.client("facegate-server"), broker.client(bridge_user(SITE))
        at_server, at_bridge = Recorder(), Recorder()
        _subscribe(server, "facegate/#", at_server)
        _subscribe(bridge, "facegate/#", at_bridge)

        own = TOPICS.events("door-1")
        forged = {hq.events("door-1"), TOPICS.gallery_delta, TOPICS.bundle_announce, TOPICS.bundle_chunk(1),
                  TOPICS.command("door-1", "unlock"), TOPICS.events_confirm("door-1")}
        for topic in sorted(forged):
            bridge.publish(topic, b"{}", qos=1).wait_for_publish(ACK_S)
        _fence(bridge, own, at_server)
        assert not forged & at_server.topics(), forged & at_server.topics()

        carried = {TOPICS.gallery_delta, TOPICS.bundle_chunk(1), TOPICS.bundle_chunk_reply("door-1"),
                   TOPICS.events_confirm("door-1"), TOPICS.command("door-1", "unlock")}
        hidden = {hq.gallery_delta, hq.bundle_announce, hq.command("door-1", "unlock"),
                  hq.events_confirm("door-1"), TOPICS.snapshot("door-1")}
        for topic in sorted(hidden) + sorted(carried):
            server.publish(topic, b"{}", qos=1).wait_for_publish(ACK_S)
        _fence(server, TOPICS.bundle_announce, at_bridge)
        assert carried <= at_bridge.topics(), carried - at_bridge.topics()
        assert not hidden & at_bridge.topics(), hidden & at_bridge.topics()
        for c in (server, bridge):
            c.disconnect()
            c.loop_stop()
    finally:
        broker.close()


def test_bridge_config_and_acl_match_the_deploy_files() -> None:
    """deploy/ carries exactly what `facegate server bridge-config` prints (no hand-edited drift), and
    every bridged topic is under the site."""
    result = CliRunner().invoke(bridge_config, ["--site", SITE, "--central", "central.example.org:8883"])
    assert result.exit_code == 0, result.output
    assert (DEPLOY / "bridge-site.conf.example").read_text().endswith(result.output)
    acl = CliRunner().invoke(bridge_config, ["--site", SITE, "--acl"])
    assert acl.exit_code == 0 and acl.output == bridge_acl(TOPICS)
    assert acl.output in (DEPLOY / "facegate.acl").read_text()
    topics = [line.split() for line in result.output.splitlines() if line.startswith("topic ")]
    assert {(t[2], t[3]) for t in topics} == {("out", "1"), ("in", "1")}
    for _, pattern, _, _ in topics:
        assert pattern.startswith(f"{PREFIX}/{SITE}/") and "#" not in pattern, pattern
    refused = CliRunner().invoke(bridge_config, ["--site", "a/b"])
    assert refused.exit_code != 0 and "site" in refused.output
