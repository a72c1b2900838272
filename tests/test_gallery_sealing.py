"""Templates end to end (issue 18 point 8): the broker carries only ciphertext of the gallery.

A real broker, the real server (enrollment store, delta publisher, bundle builder and server, audit
subscriber recording the doors' keys), and two doors with the real bundle store and updater, each with
its own X25519 key. A subscriber with full read access (``#``) records every byte; no enrolled name,
person id or template may appear in it, raw or after a gzip/zlib decompress attempt. Revoking door B
rotates the site's gallery key: door A applies the next delta, door B fails closed and keeps its gallery.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from core.gallerycrypto import GalleryCryptoError, seal, unwrap
from core.mqtt.client import Message
from core.protocol.schemas import BundleAck, GalleryDelta, KeyWrap, PayloadError
from core.protocol.sealed import open_delta
from core.protocol.topics import Topics
from device.bundles.doorkey import DOOR_KEY_FILE, GALLERY_KEYS_FILE, DoorKeys
from device.bundles.errors import BundleRejected, RejectCode
from device.bundles.signing import load_public_key
from device.bundles.store import BundleStore
from device.config import BundleConfig, GalleryConfig
from device.gallery import Gallery
from models.runtime.manifest import load_manifest, save_manifest
from server.bundles.builder import load_bundle
from server.bundles.delta import DeltaLedger, MqttGallerySync
from server.bundles.gallery_bundle import build_gallery_bundle
from server.bundles.signing import sign
from server.bundles.sitekeys import DoorKeyState
from server.enrollment.sync import GalleryEntry
from server.enrollment.templates import new_template
from server.registry.model_folder import embedder_entry_name
from server.registry.promotion import PromotionContext
from server.state import AppState
from tests.bundle_kit import Device, build
from tests.conftest import Broker
from tests.mqtt_kit import Collector, keypair, make_models_dir, sha_tag, unit_vectors, wait_until
from tests.server_support import PREFIX, SITE, connected_server, login, state_of

TOPICS = Topics(PREFIX, SITE)
# Names a leak would show: non-ASCII (UTF-8 search), and unlike anything else on the wire.
NAMES = ["Zoë Quintero-Ångström", "Bartholomew Xylander", "Ingrid Nakamura-Holt"]
LATE_NAME = "Oluwaseun Revocation-Test"
SAME_TEMPLATE = 0.999  # the probe is the enrolled template itself: cosine 1 up to float rounding


@dataclass
class Site:
    """The server, the spy, the doors, the models and the persons enrolled so far."""

    client: TestClient
    spy: Collector
    doors: dict[str, Device]
    models: Path
    sha: str
    persons: dict[str, tuple[str, np.ndarray]]  # person id -> (name, template)

    @property
    def state(self) -> AppState:
        """The server's state."""
        return state_of(self.client)

    @property
    def sync(self) -> MqttGallerySync:
        """The server's delta publisher."""
        sync = self.state.sync
        assert isinstance(sync, MqttGallerySync)
        return sync


def _enroll(site: Site, name: str, seed: int) -> str:
    """A person with one stored template, its add published: as enrollment does."""
    state = site.state
    created = site.client.post("/api/persons", json={"name": name, "consent": True},
                               headers=login(site.client))
    person_id = str(created.json()["id"])
    vector = unit_vectors(1, seed)[0]
    with state.db.transaction() as session:
        template = new_template(state.cipher, person_id=person_id, chip_id=None, model_sha256=site.sha,
                                vector=vector)
        session.add(template)
        session.flush()
        template_id = template.id
    site.sync.publish_add(site.sha, [GalleryEntry(template_id, person_id, name, vector)])
    site.persons[person_id] = (name, vector)
    return person_id


def _recognises(door: Device, site: Site, person_id: str) -> bool:
    """Whether the door's working gallery matches the person's template to them, under their name."""
    name, vector = site.persons[person_id]
    active = door.store.active()
    assert active is not None
    with Gallery.open(active.working_gallery, site.sha, GalleryConfig()) as gallery:
        match = gallery.search(vector)
        return match.person_id == person_id and match.score > SAME_TEMPLATE and match.name == name


def _applied(seq: int) -> object:
    def check(ack: BundleAck) -> bool:
        return ack.delta_sequence >= seq and ack.delta_state == "applied" and ack.state == "installed"
    return check


@pytest.fixture()
def site(tmp_path: Path, mosquitto: Broker) -> Iterator[Site]:
    """Two doors installed from a sealed bundle and a sealed delta, with a full-read spy on the broker."""
    spy = Collector(mosquitto.host, mosquitto.port, ["#"], client_id="spy-reads-everything")
    doors: dict[str, Device] = {}
    with connected_server(tmp_path, mosquitto.host, mosquitto.port) as client:
        try:
            state = state_of(client)
            models, sha = make_models_dir(tmp_path / "models", sha_tag("sealing"))
            manifest = load_manifest(models)
            save_manifest(models, manifest.model_copy(update={"models": [
                e.model_copy(update={"name": embedder_entry_name(state.config)}) for e in manifest.models]}))
            public = state.config.signing_key_path.with_name("bundle.key.pub").read_text().strip()
            for name in ("door-a", "door-b"):
                doors[name] = Device(mosquitto.host, mosquitto.port, name, tmp_path / name, public,
                                     config=BundleConfig(request_idle_s=0.5), sealed=True, topics=TOPICS)
            site = Site(client, spy, doors, models, sha, {})
            keyring = site.sync.keyring
            assert keyring is not None, "gallery encryption is on by default"
            # Each door's hello carries its public key; the server trusts it on first use.
            assert wait_until(lambda: {d: v["state"] for d, v in keyring.doors().items()}
                              == {"door-a": DoorKeyState.TRUSTED, "door-b": DoorKeyState.TRUSTED})
            for door in doors.values():
                assert keyring.doors()[door.device_id]["key"] == door.store.door.public_b64  # type: ignore[union-attr]
            for i, name in enumerate(NAMES[:2]):
                _enroll(site, name, seed=100 + i)
            built = build_gallery_bundle(PromotionContext.for_state(state), models)
            assert built["gallery_key_version"] == 1 and built["wrapped_to"] == ["door-a", "door-b"]
            assert state.bundles is not None
            state.bundles.publish(load_bundle(Path(built["path"])), wait=True)
            _enroll(site, NAMES[2], seed=102)  # after the bundle: reaches the doors in the delta only
            seq = site.sync.ledger.seq
            for door in doors.values():
                door.wait(_applied(seq))  # type: ignore[arg-type]
            yield site
        finally:
            for door in doors.values():
                door.close()
            spy.close()


# ----------------------------------------------------------------------------- what the spy may learn


def _views(payload: bytes) -> list[bytes]:
    """The payload and whatever a gzip or zlib decompress attempt makes of it (at any offset a chunk
    header could hide the stream behind)."""
    views = [payload]
    for start in {0, payload.find(b"\x1f\x8b"), payload.find(b"\x78")} - {-1}:
        for opener in (gzip.decompress, zlib.decompress):
            try:
                views.append(opener(payload[start:]))
            except (OSError, zlib.error, EOFError, ValueError):
                pass
    return views


def _needles(persons: dict[str, tuple[str, np.ndarray]]) -> dict[str, bytes]:
    """What a leak would contain: each name (UTF-8), person id, float32 template, and the JSON text of a
    template's first values (as a plaintext delta writes them)."""
    needles: dict[str, bytes] = {}
    for pid, (name, vector) in persons.items():
        needles[f"name of {pid}"] = name.encode("utf-8")
        needles[f"id {pid}"] = pid.encode("utf-8")
        needles[f"float32 template of {pid}"] = np.asarray(vector, "<f4").tobytes()
        needles[f"float32 head of {pid}"] = np.asarray(vector[:4], "<f4").tobytes()
        needles[f"JSON template of {pid}"] = json.dumps(float(vector[0])).encode()
    return needles


def _leaks(messages: list[Message], needles: dict[str, bytes]) -> list[str]:
    found = []
    for message in messages:
        for view in _views(message.payload):
            found += [f"{what} on {message.topic}" for what, needle in needles.items() if needle in view]
    return found


def test_end_to_end_full_read_subscriber_learns_no_name_and_no_vector(site: Site) -> None:
    # Both doors run the sealed bundle and the sealed delta, and recognise every enrolled person.
    for door in site.doors.values():
        for pid in site.persons:
            assert _recognises(door, site, pid), f"{door.device_id} does not recognise {pid}"
    messages = list(site.spy.messages)
    topics = {m.topic for m in messages}
    assert TOPICS.gallery_delta in topics and TOPICS.bundle_announce in topics
    assert any(t.endswith("/chunk") for t in topics), "the spy saw the bundle's chunks"
    assert sum(len(m.payload) for m in messages) > 0
    needles = _needles(site.persons)
    assert _leaks(messages, needles) == []

    # The detector is not blind: the same search finds every needle in a plaintext delta of these persons,
    # raw and gzipped, and in the bundle's gallery files before sealing.
    key, _public = keypair()
    ledger = DeltaLedger(site.state.config.data_dir / "control-ledger")
    ledger.path.parent.mkdir()
    ledger.add(site.sha, [GalleryEntry(f"t-{pid}", pid, name, vector)
                          for pid, (name, vector) in site.persons.items()])
    plain = ledger.delta(key).to_bytes()
    control = [Message("control", plain, 1, False), Message("control", gzip.compress(plain), 1, False)]
    for what in needles:
        if what.startswith(("name", "id", "JSON")):
            assert _leaks(control, {what: needles[what]}), f"the detector misses the {what} in plaintext"
    export = site.state.config.data_dir / "control-export"
    from server.bundles.gallery_export import export_gallery

    with site.state.db.session() as session:
        export_gallery(session, site.state.cipher, site.sha, export)
    files = [Message("control", p.read_bytes(), 1, False) for p in export.iterdir() if p.is_file()]
    for pid in site.persons:
        assert _leaks(files, {"t": needles[f"float32 template of {pid}"]}), "the detector misses a vector"

    # The retained delta is signed over its ciphertext and wraps, carries no plaintext fields, and
    # wraps the key to exactly the two doors.
    delta = GalleryDelta.parse(site.spy.on_topic(TOPICS.gallery_delta)[-1].payload)
    assert delta.sealed and delta.add == [] and delta.remove == [] and delta.key_version == 1
    assert sorted({w.device for w in delta.keys}) == ["door-a", "door-b"]


def test_revoke_door_b_rotates_the_key_and_b_cannot_read_the_next_delta(site: Site) -> None:
    door_a, door_b = site.doors["door-a"], site.doors["door-b"]
    applied_b = door_b.updater.last_ack.delta_sequence
    response = site.client.post("/api/devices/door-b/revoke", headers=login(site.client))
    assert response.status_code == 200, response.text
    assert response.json()["gallery_key_version"] == 2
    keyring = site.sync.keyring
    assert keyring is not None and keyring.doors()["door-b"]["state"] == DoorKeyState.REVOKED

    late = _enroll(site, LATE_NAME, seed=200)  # the next delta, under the new key
    seq = site.sync.ledger.seq
    door_a.wait(_applied(seq))  # type: ignore[arg-type]
    assert _recognises(door_a, site, late)

    # Door B fails closed: it reports the error, keeps its gallery and its last delta, and B's keys
    # (version 1 only) do not open the new delta.
    ack = door_b.wait(lambda a: a.delta_sequence == seq and a.delta_state == "rejected")
    assert ack.delta_reason is not None and ack.delta_reason.startswith(RejectCode.NO_GALLERY_KEY.value)
    assert door_b.store.door is not None and door_b.store.door.versions == [1]
    stored = door_b.store.load_signed_delta()  # the last delta B could open: under key 1, before the revoke
    assert stored is not None and stored.key_version == 1 and applied_b <= stored.seq < seq
    assert not _recognises(door_b, site, late)
    for pid in site.persons:
        if pid != late:
            assert _recognises(door_b, site, pid), "door B lost its old gallery"

    delta = GalleryDelta.parse(site.spy.on_topic(TOPICS.gallery_delta)[-1].payload)
    assert delta.seq == seq and delta.key_version == 2
    assert {w.device for w in delta.keys if w.version == 2} == {"door-a"}
    assert all(w.device != "door-b" for w in delta.keys), "a revoked door gets no wrap of any version"
    old_key = door_b.store.door.key(1)
    assert old_key is not None
    with pytest.raises(GalleryCryptoError):
        open_delta(delta, old_key)
    # ...while door A's unwrapped version 2 opens it (the refusal is the key, not a broken delta).
    key_a = door_a.store.door.key(2) if door_a.store.door is not None else None
    assert key_a is not None and LATE_NAME in [p.name for p in open_delta(delta, key_a).add]
    assert _leaks(list(site.spy.messages), _needles(site.persons)) == []

    # The admin's view, and re-admitting the door (its key approved again): it catches up by itself.
    listed = site.client.get("/api/devices/keys", headers=login(site.client)).json()
    assert listed["gallery_key_version"] == 2 and listed["doors"]["door-b"]["state"] == "revoked"
    approved = site.client.post("/api/devices/door-b/approve-key", headers=login(site.client))
    assert approved.status_code == 200, approved.text
    door_b.wait(_applied(approved.json()["delta_sequence"]))  # type: ignore[arg-type]
    assert _recognises(door_b, site, late) and door_b.store.door.versions == [1, 2]


# ----------------------------------------------------------------------------- unit checks of the pieces


def test_end_to_end_door_key_is_private_and_wraps_bind_door_and_version(tmp_path: Path) -> None:
    door = DoorKeys(tmp_path / "a", "door-a")
    assert (tmp_path / "a" / DOOR_KEY_FILE).stat().st_mode & 0o777 == 0o600
    assert DoorKeys(tmp_path / "a", "door-a").public_b64 == door.public_b64  # made once, then kept
    from core.gallerycrypto import load_public, new_gallery_key, wrap

    gallery_key = new_gallery_key()
    epk, sealed = wrap(gallery_key, load_public(door.public_b64), "door-a", 3)
    other = DoorKeys(tmp_path / "b", "door-b")
    # Another door, a relabelled door id or version: none opens.
    assert other.learn([KeyWrap(device="door-b", version=3, epk=epk, sealed=sealed)]) == []
    assert door.learn([KeyWrap(device="door-a", version=4, epk=epk, sealed=sealed)]) == []
    assert door.learn([KeyWrap(device="door-a", version=3, epk=epk, sealed=sealed)]) == [3]
    assert door.key(3) == gallery_key
    assert (tmp_path / "a" / GALLERY_KEYS_FILE).stat().st_mode & 0o777 == 0o600
    assert DoorKeys(tmp_path / "a", "door-a").key(3) == gallery_key  # survives a restart
    with pytest.raises(GalleryCryptoError):
        unwrap(DoorKeys(tmp_path / "c", "door-a")._private, epk, sealed, "door-a", 3)


def test_end_to_end_plaintext_gallery_is_refused_as_a_downgrade(tmp_path: Path) -> None:
    key, public = keypair()
    store = BundleStore(tmp_path / "door", load_public_key(public), door=DoorKeys(tmp_path / "door", "d"))
    plain = build(tmp_path, key, 1)  # a correctly signed bundle whose gallery is not sealed
    with pytest.raises(BundleRejected) as refused:
        store.check_announce(plain.announce)
    assert refused.value.code is RejectCode.PLAINTEXT
    delta = GalleryDelta.model_validate({"seq": 1, "bundle_sequence": 0, "model_sha256": "a" * 64,
                                         "created": "2026-01-01T00:00:00+00:00", "remove": ["p1"]})
    signed = delta.model_copy(update={"signature": sign(key, _signed_bytes(delta))})
    with pytest.raises(BundleRejected) as refused:
        store.accept_delta(signed)
    assert refused.value.code is RejectCode.PLAINTEXT
    assert store.load_signed_delta() is None
    # A sealed delta that also carries plaintext content is refused too (no mixed downgrade).
    sealed = signed.model_copy(update={"sealed": "AAAA", "key_version": 1, "signature": None})
    sealed = sealed.model_copy(update={"signature": sign(key, _signed_bytes(sealed))})
    with pytest.raises(BundleRejected) as refused:
        store.accept_delta(sealed)
    assert refused.value.code is RejectCode.MALFORMED


def test_end_to_end_sealed_content_is_bound_to_its_delta(tmp_path: Path) -> None:
    from core.gallerycrypto import b64, delta_associated, new_gallery_key

    gallery_key = new_gallery_key()
    delta = GalleryDelta.model_validate({"seq": 5, "bundle_sequence": 0, "model_sha256": "b" * 64,
                                         "created": "2026-01-01T00:00:00+00:00"})
    blob = seal(gallery_key, b'{"add":[],"remove":["x"]}', delta_associated(4, "b" * 64))
    moved = delta.model_copy(update={"sealed": b64(blob), "key_version": 1})
    with pytest.raises(GalleryCryptoError):
        open_delta(moved, gallery_key)  # ciphertext of delta 4 pasted into delta 5
    junk = seal(gallery_key, b"not json", delta_associated(5, "b" * 64))
    with pytest.raises(PayloadError):
        open_delta(delta.model_copy(update={"sealed": b64(junk), "key_version": 1}), gallery_key)


def _signed_bytes(delta: GalleryDelta) -> bytes:
    from core.protocol.schemas import canonical_json

    return canonical_json(delta.signed_part())


def test_revoke_door_in_the_keyring_and_cli_trust_on_first_use_then_approval(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from server.bundles.cli import cli
    from server.bundles.sitekeys import KEYRING_FILE, SiteKeyring
    from server.crypto import load_chip_cipher
    from tests.server_support import make_config

    config = make_config(tmp_path)
    config_file = tmp_path / "server.toml"
    config_file.write_text(f'data_dir = "{config.data_dir}"\n[mqtt]\nsite = "{SITE}"\n', encoding="utf-8")
    keyring = SiteKeyring(config.bundles_root, load_chip_cipher(config), config.mqtt.site)
    a, b = DoorKeys(tmp_path / "a", "door-a"), DoorKeys(tmp_path / "b", "door-b")
    b_again = DoorKeys(tmp_path / "b2", "door-b")  # door-b re-installed: a new key pair
    assert keyring.observe("door-a", a.public_b64) and keyring.observe("door-b", b.public_b64)
    assert not keyring.observe("door-a", a.public_b64)  # the same key again: nothing new
    first = keyring.sealer()
    assert first.version == 1 and {w.device for w in first.keys} == {"door-a", "door-b"}
    assert a.learn(first.keys) == [1] and b.learn(first.keys) == [1] and a.key(1) == first.key
    stored = (config.bundles_root / KEYRING_FILE).read_bytes()
    assert first.key not in stored and b64_of(first.key).encode() not in stored  # sealed at rest
    assert (config.bundles_root / KEYRING_FILE).stat().st_mode & 0o777 == 0o600

    # A different key for a known door id is not trusted until approved.
    assert not keyring.observe("door-b", b_again.public_b64)
    assert keyring.doors()["door-b"]["pending"] == b_again.public_b64
    assert b_again.learn(keyring.sealer().keys) == []

    runner = CliRunner()
    revoked = runner.invoke(cli, ["revoke-door", "door-b", "--config", str(config_file)])
    assert revoked.exit_code == 0, revoked.output
    assert json.loads(revoked.stdout) == {"device": "door-b", "gallery_key_version": 2}
    second = keyring.sealer()
    assert second.version == 2 and second.key != first.key
    assert {w.device for w in second.keys} == {"door-a"}  # versions 1 and 2, to door A only
    assert b.learn(second.keys) == [] and b.key(2) is None and a.learn(second.keys) == [2]
    listed = runner.invoke(cli, ["doors", "--config", str(config_file)])
    assert json.loads(listed.stdout)["doors"]["door-b"]["state"] == DoorKeyState.REVOKED

    approved = runner.invoke(cli, ["approve-door", "door-b", "--config", str(config_file)])
    assert approved.exit_code == 0 and json.loads(approved.stdout)["state"] == DoorKeyState.TRUSTED
    assert b_again.learn(keyring.sealer().keys) == [1, 2]  # the re-installed door's new key
    assert b.learn(keyring.sealer().keys) == []  # the old key of door-b: nothing
    unknown = runner.invoke(cli, ["approve-door", "door-z", "--config", str(config_file)])
    assert unknown.exit_code != 0 and "no door 'door-z'" in unknown.output
    # With trust_new_doors off, a new door waits for the approval (a broker without per-door ACLs).
    strict = SiteKeyring(tmp_path / "strict", load_chip_cipher(config), SITE, trust_new_doors=False)
    assert not strict.observe("door-a", a.public_b64)
    assert strict.doors()["door-a"]["state"] == DoorKeyState.NEW and strict.sealer().keys == []
    strict.approve("door-a")
    assert {w.device for w in strict.sealer().keys} == {"door-a"}
    # Another site's config does not touch (or silently re-key) this keyring.
    other = tmp_path / "other.toml"
    other.write_text(f'data_dir = "{config.data_dir}"\n[mqtt]\nsite = "elsewhere"\n', encoding="utf-8")
    wrong = runner.invoke(cli, ["revoke-door", "door-a", "--config", str(other)])
    assert wrong.exit_code != 0 and "belongs to site" in wrong.output
    assert keyring.current_version == 2


def b64_of(data: bytes) -> str:
    """Base64 text of ``data``."""
    import base64

    return base64.b64encode(data).decode("ascii")


def test_end_to_end_cli_build_seals_a_gallery_folder_by_default(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from server.bundles.cli import cli
    from server.bundles.signing import generate_key
    from server.bundles.sitekeys import SiteKeyring
    from server.crypto import load_chip_cipher
    from tests.bundle_kit import PERSONS, opened_gallery
    from tests.mqtt_kit import make_gallery
    from tests.server_support import make_config

    config = make_config(tmp_path)
    config_file = tmp_path / "server.toml"
    config_file.write_text(f'data_dir = "{config.data_dir}"\n[mqtt]\nsite = "{SITE}"\n', encoding="utf-8")
    keyring = SiteKeyring(config.bundles_root, load_chip_cipher(config), SITE)
    door = DoorKeys(tmp_path / "door", "door-1")
    assert keyring.observe("door-1", door.public_b64)
    generate_key(config.signing_key_path)
    models, sha = make_models_dir(tmp_path / "models", sha_tag("cli-seal"))
    gallery = make_gallery(tmp_path / "gallery", sha, PERSONS)
    built = CliRunner().invoke(cli, ["build", "--config", str(config_file), "--models", str(models),
                                     "--gallery", str(gallery), "--json"])
    assert built.exit_code == 0, built.output
    info = json.loads(built.stdout)
    assert info["gallery_key_version"] == 1 and info["wrapped_to"] == ["door-1"]
    bundle = Path(info["path"])
    names = [f"name-{pid}".encode() for pid in PERSONS]
    assert any(names[0] in p.read_bytes() for p in gallery.iterdir())  # the check would see plaintext
    for path in (bundle / "gallery").iterdir():
        assert not any(name in path.read_bytes() for name in names), f"{path.name} is not sealed"
    door.learn(load_bundle(bundle).manifest.keys)
    key = door.key(1)
    assert key is not None
    with Gallery.open(opened_gallery(bundle, key, tmp_path / "opened"), sha, GalleryConfig()) as opened:
        assert set(opened.persons()) == set(PERSONS)
