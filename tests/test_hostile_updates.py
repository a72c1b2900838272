"""Hostile updates against the real device updater over real mosquitto (issue 18): a reused sequence,
replayed or foreign-key deltas, no pinned key, a deleted person in an older-built bundle, path traversal
through a signed manifest, and SIGKILL while downloading."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from core.protocol.schemas import BundleAck, manifest_bytes
from device.bundles.errors import RejectCode
from server.bundles.delta import MqttGallerySync
from server.bundles.signing import sign
from server.enrollment.sync import GalleryEntry
from tests.bundle_kit import PERSONS, TOPICS, Device, Server, build, resign, serving
from tests.conftest import Broker
from tests.mqtt_kit import CONNECT_S, STALL_S, Collector, keypair, unit_vectors, wait_until
from tests.test_mqtt_bundles import _persons, delta_acked, installed, rejected

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def key() -> tuple[Ed25519PrivateKey, str]:
    return keypair()


@pytest.fixture()
def server(mosquitto: Broker, tmp_path: Path) -> Iterator[Server]:
    srv = Server(mosquitto.host, mosquitto.port, tmp_path / "bundles")
    yield srv
    srv.close()


def test_hostile_same_sequence_announce_with_another_manifest(mosquitto: Broker, server: Server,
                                                              tmp_path: Path,
                                                              key: tuple[Ed25519PrivateKey, str]) -> None:
    """A validly signed announce reusing the running sequence with a different manifest is refused and
    never acked as installed; the running bundle keeps serving."""
    private, public = key
    b2 = build(tmp_path, private, 2)
    device = Device(mosquitto.host, mosquitto.port, "door-1", tmp_path / "d1", public)
    try:
        assert device.client.wait_connected(CONNECT_S)
        server.bundles.publish(b2)
        device.wait(installed(2))
        running = manifest_bytes(device.store.active().manifest)  # type: ignore[union-attr]
        other = b2.manifest.model_copy(update={"model_version": "other@2"})
        assert manifest_bytes(other) != running
        forged = b2.announce.model_copy(update={"manifest": other,
                                                "signature": sign(private, manifest_bytes(other))})
        server.bundles.publish_announce(forged)
        ack = device.wait(rejected(2, RejectCode.REPLAY))
        assert ack.state == "rejected" and "different manifest" in (ack.reason or "")
        assert manifest_bytes(serving(device.store).manifest) == running
    finally:
        device.close()


def test_hostile_replayed_older_delta_and_foreign_key_delta(mosquitto: Broker, server: Server,
                                                            tmp_path: Path,
                                                            key: tuple[Ed25519PrivateKey, str]) -> None:
    """An older signed delta replayed (re-adding a removed person) and a delta signed with another key
    leave the gallery as the newest genuine delta made it."""
    private, public = key
    other_key, _ = keypair()
    bundle = build(tmp_path, private, 1)
    sha = bundle.manifest.embedder_sha256
    sync = MqttGallerySync(server.client, TOPICS, tmp_path / "ledger", private)
    device = Device(mosquitto.host, mosquitto.port, "door-1", tmp_path / "d1", public)
    try:
        server.bundles.publish(bundle)
        device.wait(installed(1))
        carol = GalleryEntry("t-carol-1", "carol", "Carol", unit_vectors(1, 42)[0])
        seq_add = sync.publish_add(sha, [carol])
        assert seq_add is not None
        device.wait(delta_acked(seq_add))
        older = sync.ledger.delta(private)  # genuinely signed, from before alice was deleted
        seq_remove = sync.publish_remove(sha, "alice", ["t1", "t2"])
        assert seq_remove is not None and seq_remove > older.seq
        device.wait(delta_acked(seq_remove))
        assert "alice" not in _persons(device)

        server.client.publish(TOPICS.gallery_delta, older.to_bytes(), qos=1, retain=True)  # the replay
        foreign = sync.ledger.delta(private).model_copy(update={"seq": seq_remove + 5, "remove": []})
        foreign = foreign.model_copy(update={"signature": sign(other_key, _signed(foreign))})
        server.client.publish(TOPICS.gallery_delta, foreign.to_bytes(), qos=1, retain=True)
        # The updater handles messages in order: once the foreign delta is acked, the replay was handled.
        ack = device.wait(delta_acked(seq_remove + 5, "rejected"))
        assert (ack.delta_reason or "").startswith(RejectCode.BAD_SIGNATURE.value)
        assert device.store.load_delta().seq == seq_remove  # type: ignore[union-attr]
        assert _persons(device) == {"bob", "carol"}
    finally:
        device.close()


def _signed(delta: object) -> bytes:
    from core.protocol.schemas import canonical_json

    return canonical_json(delta.signed_part())  # type: ignore[attr-defined]


def test_hostile_no_pinned_key_refuses_bundles_and_deltas(mosquitto: Broker, server: Server, tmp_path: Path,
                                                          key: tuple[Ed25519PrivateKey, str]) -> None:
    """A door without a pinned public key installs nothing and applies no delta."""
    private, _public = key
    bundle = build(tmp_path, private, 1)
    sync = MqttGallerySync(server.client, TOPICS, tmp_path / "ledger", private)
    device = Device(mosquitto.host, mosquitto.port, "door-1", tmp_path / "d1", None)
    try:
        server.bundles.publish(bundle)
        device.wait(rejected(1, RejectCode.NO_KEY))
        seq = sync.publish_remove(bundle.manifest.embedder_sha256, "alice", ["t1"])
        assert seq is not None
        ack = device.wait(delta_acked(seq, "rejected"))
        assert (ack.delta_reason or "").startswith(RejectCode.NO_KEY.value)
        assert device.store.active() is None and device.store.load_delta() is None
    finally:
        device.close()


def test_hostile_person_deleted_after_bundle_built_stays_deleted(mosquitto: Broker, server: Server,
                                                                 tmp_path: Path,
                                                                 key: tuple[Ed25519PrivateKey, str]) -> None:
    """Bundle 2 is built with alice; alice is then deleted (delta); bundle 2 installs later: alice must
    not come back."""
    private, public = key
    b1 = build(tmp_path, private, 1)
    b2 = build(tmp_path, private, 2)  # built now: holds alice
    assert b1.manifest.embedder_sha256 == b2.manifest.embedder_sha256
    sync = MqttGallerySync(server.client, TOPICS, tmp_path / "ledger", private)
    device = Device(mosquitto.host, mosquitto.port, "door-1", tmp_path / "d1", public)
    try:
        server.bundles.publish(b1)
        device.wait(installed(1))
        seq = sync.publish_remove(b1.manifest.embedder_sha256, "alice", ["t1", "t2"])
        assert seq is not None
        device.wait(delta_acked(seq))
        assert "alice" not in _persons(device)
        server.bundles.publish(b2)
        device.wait(installed(2))
        assert wait_until(lambda: "alice" not in _persons(device)), "a deleted person came back"
        assert _persons(device) == set(PERSONS) - {"alice"}
    finally:
        device.close()


TRAVERSALS = ["../evil.bin", "/tmp/evil.bin", "gallery/../../evil.bin", "models/./evil.bin", "..",
              "models\\..\\..\\evil.bin", "models//evil.bin", "models/%2e%2e/evil.bin",
              "models/\u2024\u2024/x", "models/evil.bin\x00.json", "models/" + "a" * 300]


@pytest.mark.parametrize("path", TRAVERSALS, ids=range(len(TRAVERSALS)))
def test_hostile_traversal_through_a_signed_manifest(mosquitto: Broker, server: Server, tmp_path: Path,
                                                     key: tuple[Ed25519PrivateKey, str], path: str) -> None:
    """A manifest signed with the real key but naming a path outside the bundle is refused before any
    download; nothing is written outside the store and a good bundle still installs after it."""
    private, public = key
    b1 = build(tmp_path, private, 1)
    device = Device(mosquitto.host, mosquitto.port, "door-1", tmp_path / "d1", public)
    try:
        server.bundles.publish(b1)
        device.wait(installed(1))
        raw = json.loads(b1.announce.to_bytes())
        raw["manifest"]["sequence"] = 2
        raw["manifest"]["files"][0]["path"] = path
        from core.protocol.schemas import canonical_json

        raw["signature"] = sign(private, canonical_json(raw["manifest"]))
        server.client.publish(TOPICS.bundle_announce, json.dumps(raw).encode(), qos=1, retain=True)
        b3 = resign(b1, private, tmp_path / "b3", lambda r, m: m.model_copy(update={"sequence": 3}))
        server.bundles.publish(b3)
        device.wait(installed(3))
        serving(device.store)
        assert not (tmp_path / "evil.bin").exists() and not Path("/tmp/evil.bin").exists()
        leaked = [p for p in tmp_path.rglob("evil.bin*")]
        assert not leaked, leaked
    finally:
        device.close()


DEVICE_PROCESS = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from tests.bundle_kit import Device
    host, port, data, public = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
    device = Device(host, port, "door-k", data, public)
    print("up", flush=True)
    while True:
        time.sleep(1)
""")
CROWD = 3000  # gallery templates, so the download spans many chunks
KILL_AT_PERCENT = (5.0, 40.0, 80.0)  # kill the device process when its download passes these


def test_hostile_sigkill_during_mqtt_download_resumes_to_a_good_bundle(mosquitto: Broker, server: Server,
                                                                       tmp_path: Path,
                                                                       key: tuple[Ed25519PrivateKey, str]
                                                                       ) -> None:
    """SIGKILL a real device process while it downloads over MQTT, several times: each restart keeps the
    running bundle serving, and the download finishes into a bundle that verifies."""
    private, public = key
    b1 = build(tmp_path, private, 1)
    b2 = build(tmp_path, private, 2, persons={**PERSONS, **{f"crowd-{i}": 1 for i in range(CROWD)}},
               chunk_size=4096)
    data = tmp_path / "dk"
    first = Device(mosquitto.host, mosquitto.port, "door-k", data, public)
    server.bundles.publish(b1)
    first.wait(installed(1))
    first.close()
    acks = Collector(mosquitto.host, mosquitto.port, [TOPICS.bundle_ack("door-k")], client_id="ack-watch")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        server.bundles.publish(b2, chunks=False)  # chunks go out as the device asks for them
        for threshold in KILL_AT_PERCENT:
            proc = subprocess.Popen([sys.executable, "-c", DEVICE_PROCESS, mosquitto.host,
                                     str(mosquitto.port), str(data), public],
                                    cwd=REPO, env=env, stdout=subprocess.PIPE)
            try:
                assert proc.stdout is not None and proc.stdout.readline().strip() == b"up"
                downloading = _acked(acks, lambda a, at=threshold: a.sequence == 2
                                     and a.state == "downloading" and a.percent >= at)
                reached = acks.wait(downloading, STALL_S)
                finished = _acked(acks, lambda a: a.state == "installed" and a.running_sequence == 2)(
                    acks.messages)
                assert reached and not finished, f"the download never passed {threshold}% before finishing"
                os.kill(proc.pid, signal.SIGKILL)
                assert proc.wait(CONNECT_S) == -signal.SIGKILL, "the device was not killed"
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(CONNECT_S)
            from device.bundles.signing import load_public_key
            from device.bundles.store import BundleStore

            store = BundleStore(data / "bundles", load_public_key(public), require_sealed=False)
            assert store.recover() is not None and store.running_sequence == 1
            serving(store)
        device = Device(mosquitto.host, mosquitto.port, "door-k", data, public)
        try:
            device.wait(installed(2))
            assert serving(device.store).sequence == 2
        finally:
            device.close()
    finally:
        acks.close()


def _acked(collector: Collector, predicate: Callable[[BundleAck], bool]) -> Callable[[list[object]], bool]:
    """A Collector predicate: some ack message satisfies ``predicate``."""

    def check(messages: list[object]) -> bool:
        for message in messages:
            try:
                ack = BundleAck.parse(message.payload)  # type: ignore[attr-defined]
            except ValueError:
                continue
            if predicate(ack):
                return True
        return False

    return check


FLOOD_REFS = 512  # chunks a flooding request names (above the server's per-request cap)
FLOOD_MAX_REQUESTS = 5000  # a bound on the flooder's loop
FLOOD_PAUSE_S = 0.002  # between flood requests: hundreds per second, far above the rate limit


def test_flood_door_cannot_delay_another_doors_install(mosquitto: Broker, server: Server, tmp_path: Path,
                                                       key: tuple[Ed25519PrivateKey, str]) -> None:
    """A door that floods chunk requests (oversized, too frequent, and forged in another door's name)
    cannot starve another door: between one of door-2's requests being queued and being answered, the
    flooder gets at most two requests' worth of chunks (the one being answered plus one round-robin
    turn), each request is capped, the rate limit drops most of the flood, and door-2 installs."""
    from core.mqtt.client import ClientSettings, MqttClient
    from core.protocol.schemas import ChunkRef, ChunkRequest
    from server.bundles import publisher

    private, public = key
    bundle = build(tmp_path, private, 1, persons={**PERSONS, **{f"crowd-{i}": 1 for i in range(CROWD)}},
                   chunk_size=4096)
    total = bundle.manifest.total_chunks
    refs = [ChunkRef(file_index=f, index=i) for f in range(len(bundle.manifest.files))
            for i in range(bundle.manifest.chunk_count(f))][:FLOOD_REFS]
    assert total > publisher.MAX_CHUNKS_PER_REQUEST and len(refs) > publisher.MAX_CHUNKS_PER_REQUEST
    flooder = MqttClient(ClientSettings(mosquitto.host, mosquitto.port, "door-f")).start()
    assert flooder.wait_connected(CONNECT_S)
    stop = threading.Event()
    sent = {"own": 0, "forged": 0}

    def flood() -> None:
        n = 0
        while not stop.is_set() and n < FLOOD_MAX_REQUESTS:
            forged = n % 4 == 3
            request = ChunkRequest(device="door-2" if forged else "door-f", sequence=1,
                                   correlation_id=f"flood{n}", chunks=refs)
            flooder.publish(TOPICS.bundle_request("door-f"), request.to_bytes(), qos=0)
            sent["forged" if forged else "own"] += 1
            n += 1
            stop.wait(FLOOD_PAUSE_S)

    server.bundles.publish(bundle, chunks=False)  # every chunk must be asked for
    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    device = Device(mosquitto.host, mosquitto.port, "door-2", tmp_path / "d2", public)
    try:
        device.wait(installed(1))
        serving(device.store)
    finally:
        stop.set()
        thread.join(CONNECT_S)
        device.close()
        flooder.close()
    log = list(server.bundles.served_log)
    assert any(d == "door-f" and e == "served" for e, d, _ in log), "the flood was never answered at all"
    assert all(n <= publisher.MAX_CHUNKS_PER_REQUEST for e, _, n in log if e == "served")
    worst = 0
    waiting = False
    flood_chunks = 0
    for event, device_id, chunks in log:
        if device_id == "door-2" and event == "queued" and not waiting:
            waiting, flood_chunks = True, 0
        elif device_id == "door-2" and event == "served":
            worst, waiting = max(worst, flood_chunks), False
        elif device_id == "door-f" and event == "served" and waiting:
            flood_chunks += chunks
    bound = 2 * publisher.MAX_CHUNKS_PER_REQUEST
    print(f"flood: {sent} requests sent, {server.bundles.dropped_requests} dropped; worst flood chunks "
          f"ahead of a door-2 request: {worst} (bound {bound}); door-2 needed {total} chunks")
    assert worst <= bound
    forged_served = [d for e, d, _ in log if e == "queued" and d == "door-2"]
    served_flood = sum(1 for e, d, _ in log if e == "served" and d == "door-f")
    assert server.bundles.dropped_requests >= sent["forged"]  # every forged request dropped, and more
    assert served_flood < sent["own"], "the rate limit dropped none of the flood"
    assert forged_served  # door-2's own requests were queued and served
