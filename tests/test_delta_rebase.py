"""Gallery delta rebasing: adds leave the retained delta only once every known door runs a bundle whose
gallery (exported after the add) holds them. Real mosquitto, real SQLite, real bundles, simulated doors."""

from __future__ import annotations

import datetime as dt
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from core.protocol.schemas import BundleAck, GalleryDelta, canonical_json, utcnow
from device.bundles.signing import load_public_key, verify
from models.runtime.manifest import load_manifest, save_manifest
from server.bundles.builder import EXPORT_JSON, export_time
from server.bundles.delta import (
    ADDED_AT,
    STATE_FILE,
    DeltaLedger,
    GalleryCoverage,
    MqttGallerySync,
    reseal_ledger,
)
from server.bundles.gallery_bundle import build_gallery_bundle
from server.bundles.rebase import CoverageCache, DeltaRebaser, plan
from server.crypto import ChipCipher
from server.db.models import Device
from server.enrollment.sync import GalleryEntry, SyncError
from server.enrollment.templates import new_template
from server.registry.model_folder import embedder_entry_name
from server.registry.promotion import PromotionContext
from server.state import AppState
from tests.bundle_kit import build as build_from_gallery_folder
from tests.conftest import Broker
from tests.mqtt_kit import keypair, make_models_dir, sha_tag, unit_vectors
from tests.server_support import connected_server, delta_opener, login, state_of, wait_until
from tests.test_server_deletion import Door


@pytest.fixture()
def client(tmp_path: Path, mosquitto: Broker) -> Iterator[TestClient]:
    with connected_server(tmp_path, mosquitto.host, mosquitto.port) as test_client:
        yield test_client


@pytest.fixture()
def models(tmp_path: Path, client: TestClient) -> tuple[Path, str]:
    """A real (tiny) models folder whose embedder entry has the name the server config expects."""
    folder, sha = make_models_dir(tmp_path / "models", sha_tag("rebase"))
    manifest = load_manifest(folder)
    name = embedder_entry_name(state_of(client).config)
    save_manifest(folder, manifest.model_copy(update={"models": [
        e.model_copy(update={"name": name}) for e in manifest.models]}))
    return folder, sha


def _sync(state: AppState) -> MqttGallerySync:
    assert isinstance(state.sync, MqttGallerySync)
    return state.sync


def _rebaser(state: AppState) -> DeltaRebaser:
    return next(c for c in state.extra_closers if isinstance(c, DeltaRebaser))


def _enroll(client: TestClient, sha: str, name: str, seed: int, person_id: str | None = None) -> str:
    """Store a template (new person unless ``person_id``), commit, publish the add: as enrollment does."""
    state = state_of(client)
    if person_id is None:
        created = client.post("/api/persons", json={"name": name, "consent": True}, headers=login(client))
        person_id = str(created.json()["id"])
    vector = unit_vectors(1, seed)[0]
    with state.db.transaction() as session:
        template = new_template(state.cipher, person_id=person_id, chip_id=None, model_sha256=sha,
                                vector=vector)
        session.add(template)
        session.flush()
        template_id = template.id
    _sync(state).publish_add(sha, [GalleryEntry(template_id, person_id, name, vector)])
    return person_id


def _bundle(client: TestClient, models: tuple[Path, str]) -> int:
    state = state_of(client)
    return int(build_gallery_bundle(PromotionContext.for_state(state), models[0])["sequence"])


def _running(door: Door, sequence: int) -> None:
    """The door's retained ack: it runs bundle ``sequence``."""
    door.ack(BundleAck(device=door.device_id, sequence=sequence, state="installed", percent=100.0,
                       running_sequence=sequence, ts=dt.datetime.now(dt.UTC)))
    door.flush()


def _runs(client: TestClient, device: str, sequence: int) -> bool:
    """Whether the server recorded ``device`` running bundle ``sequence``."""
    with state_of(client).db.session() as session:
        row = session.get(Device, device)
        return row is not None and row.bundle_sequence == sequence


def _retained(client: TestClient, door: Door, seq: int) -> GalleryDelta:
    """The delta ``seq`` as the door received it from the broker, signature verified."""
    wait_until(lambda: any(d.seq == seq for d in door.deltas), f"delta {seq} at {door.device_id}")
    index = next(i for i, d in enumerate(door.deltas) if d.seq == seq)
    signed = door.signed[index]
    public = state_of(client).config.signing_key_path.with_name("bundle.key.pub").read_text().strip()
    verify(load_public_key(public), signed.signature, canonical_json(signed.signed_part()), "delta")
    return door.deltas[index]  # opened


def test_adds_leave_the_delta_only_when_every_door_runs_a_bundle_holding_them(
        client: TestClient, models: tuple[Path, str], mosquitto: Broker) -> None:
    state = state_of(client)
    sync, rebaser = _sync(state), _rebaser(state)
    sha = models[1]
    doors = [Door(mosquitto, "door-1", auto_ack=False, opener=delta_opener(client)),
             Door(mosquitto, "door-2", auto_ack=False, opener=delta_opener(client))]
    try:
        assert _bundle(client, models) == 1  # empty gallery: both doors start on it
        for door in doors:
            _running(door, 1)
        wait_until(lambda: sync.ledger.bundle_sequence == 1, "the (empty) rebase onto bundle 1")

        gone = _enroll(client, sha, "Gone", seed=3)
        client.delete(f"/api/persons/{gone}?wait_s=0", headers=login(client))
        a = _enroll(client, sha, "Ada", seed=1)
        assert _bundle(client, models) == 2  # holds Ada
        b = _enroll(client, sha, "Bea", seed=2)  # after bundle 2's export

        _running(doors[0], 2)
        wait_until(lambda: _runs(client, "door-1", 2), "door-1 on bundle 2")
        seq_before = sync.ledger.seq
        # door-2 still serves bundle 1 + delta: dropping Ada now would lock her out there.
        assert rebaser.rebase_now() is None
        assert set(sync.ledger.adds) == {a, b} and sync.ledger.seq == seq_before
        delta = _retained(client, doors[1], seq_before)
        assert {p.person_id for p in delta.add} == {a, b}

        _running(doors[1], 2)  # the ack alone triggers the rebase in the server
        wait_until(lambda: sync.ledger.bundle_sequence == 2, "the rebase onto bundle 2")
        assert sync.ledger.seq == seq_before + 1
        delta = _retained(client, doors[1], sync.ledger.seq)
        assert delta.bundle_sequence == 2
        assert [p.person_id for p in delta.add] == [b]  # Bea was enrolled after the export
        assert gone in delta.remove  # tombstones stay
        assert rebaser.rebase_now() is None and sync.ledger.seq == seq_before + 1  # idempotent
    finally:
        for door in doors:
            door.close()
    # The smaller ledger survives a restart; on disk it is sealed (no name, no template in the clear).
    on_disk = (state.config.bundles_root / "delta_state.json").read_bytes()
    assert b"Bea" not in on_disk and b"templates" not in on_disk
    reloaded = DeltaLedger(state.config.bundles_root, state.cipher)
    assert set(reloaded.adds) == {b} and reloaded.bundle_sequence == 2 and gone in reloaded.removes


def test_an_add_after_the_export_survives_until_a_later_bundle_holds_it(
        client: TestClient, models: tuple[Path, str], mosquitto: Broker) -> None:
    state = state_of(client)
    sync, rebaser = _sync(state), _rebaser(state)
    sha = models[1]
    door = Door(mosquitto, "door-x", auto_ack=False, opener=delta_opener(client))
    try:
        a = _enroll(client, sha, "Ada", seed=1)
        assert _bundle(client, models) == 1
        _enroll(client, sha, "Ada", seed=11, person_id=a)  # a second template, after the export
        _running(door, 1)
        wait_until(lambda: sync.ledger.bundle_sequence == 1, "the rebase onto bundle 1")
        assert set(sync.ledger.adds) == {a}  # bundle 1 lacks her new template: she stays
        assert len(sync.ledger.adds[a]["templates"]) == 2

        # A door joining later installs the newest bundle; it still gets every add after its export.
        assert _bundle(client, models) == 2
        late = Door(mosquitto, "door-late", auto_ack=False, opener=delta_opener(client))
        try:
            late.online()
            late.flush()
            wait_until(lambda: _devices(client) >= {"door-late"}, "door-late registered")
            assert rebaser.rebase_now() is None  # door-late reports no bundle: it blocks
            assert "no running bundle" in rebaser.last_reason
            assert {p.person_id for p in _retained(client, late, sync.ledger.seq).add} == {a}
            _running(late, 2)
            _running(door, 2)
            wait_until(lambda: sync.ledger.bundle_sequence == 2, "the rebase onto bundle 2")
            assert sync.ledger.adds == {}
        finally:
            late.close()
    finally:
        door.close()


def _devices(client: TestClient) -> set[str]:
    with state_of(client).db.session() as session:
        return set(session.scalars(select(Device.device_id)))


def test_a_ledger_from_before_add_times_loads_and_waits_for_a_newer_bundle(tmp_path: Path) -> None:
    old = {"seq": 7, "bundle_sequence": 0, "model_sha256": "a" * 64,
           "adds": {"p1": {"name": "Ada", "templates": {"t1": [1.0, 0.0]}}}, "removes": ["p0"]}
    (tmp_path / STATE_FILE).write_text(json.dumps(old), encoding="utf-8")
    before = utcnow()
    ledger = DeltaLedger(tmp_path)
    assert ledger.seq == 7 and ledger.removes == {"p0"} and set(ledger.adds) == {"p1"}
    assert dt.datetime.fromisoformat(ledger.adds["p1"][ADDED_AT]) >= before  # "unknown": stamped at load

    exported_earlier = GalleryCoverage(3, before - dt.timedelta(seconds=1), frozenset({"p1"}))
    assert ledger.rebase(3, [exported_earlier]) == 8  # the bundle_sequence moves, Ada stays
    assert set(ledger.adds) == {"p1"} and ledger.bundle_sequence == 3
    assert ledger.rebase(3, [exported_earlier]) is None

    exported_later = GalleryCoverage(4, utcnow() + dt.timedelta(seconds=1), frozenset({"p1"}))
    not_holding = GalleryCoverage(5, utcnow() + dt.timedelta(seconds=1), frozenset())
    assert ledger.rebase(4, [exported_later, not_holding]) == 9  # one gallery lacks her: kept
    assert set(ledger.adds) == {"p1"}
    assert ledger.rebase(4, [exported_later]) == 10
    assert ledger.adds == {} and ledger.removes == {"p0"}
    reloaded = DeltaLedger(tmp_path)
    assert reloaded.seq == 10 and reloaded.adds == {} and reloaded.removes == {"p0"}

    naive = {"name": "Ada", "templates": {"t1": [1.0]}, ADDED_AT: "2024-01-01T00:00:00"}
    (tmp_path / STATE_FILE).write_text(json.dumps({**old, "adds": {"p1": naive}}), encoding="utf-8")
    with pytest.raises(SyncError, match="no time zone"):
        DeltaLedger(tmp_path)


def test_the_ledger_is_sealed_at_rest_and_follows_a_chip_key_rotation(tmp_path: Path) -> None:
    old_key, new_key = ChipCipher(os.urandom(32)), ChipCipher(os.urandom(32))
    legacy = {"seq": 3, "bundle_sequence": 1, "model_sha256": "a" * 64,
              "adds": {"p1": {"name": "Ada", "templates": {"t1": [0.25, 0.5]},
                              ADDED_AT: utcnow().isoformat()}},
              "removes": ["p0"]}
    path = tmp_path / STATE_FILE
    path.write_text(json.dumps(legacy), encoding="utf-8")  # written by a release before sealing
    assert DeltaLedger(tmp_path, old_key).adds["p1"]["name"] == "Ada"
    sealed = path.read_bytes()  # ... and sealed by the first load
    assert b"Ada" not in sealed and b"0.25" not in sealed and stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(SyncError, match="sealed and no chip key"):
        DeltaLedger(tmp_path)
    with pytest.raises(SyncError, match="another key"):
        DeltaLedger(tmp_path, new_key)

    assert reseal_ledger(tmp_path, old_key, new_key)
    assert not reseal_ledger(tmp_path, old_key, new_key)  # a rerun after a crash: already done
    reloaded = DeltaLedger(tmp_path, new_key)
    assert reloaded.seq == 3 and reloaded.removes == {"p0"} and reloaded.adds["p1"]["templates"] == {
        "t1": [0.25, 0.5]}
    path.write_bytes(path.read_bytes()[:-1] + bytes([path.read_bytes()[-1] ^ 1]))  # one bit flipped
    with pytest.raises(SyncError, match="cannot be opened"):
        DeltaLedger(tmp_path, new_key)


def test_plan_blocks_on_unknown_bundles(tmp_path: Path) -> None:
    private, _public = keypair()
    root = tmp_path / "bundles"
    build_from_gallery_folder(tmp_path, private, 1)  # from a gallery folder: no export record
    cache = CoverageCache(root)
    assert export_time(root / "1") is None
    assert plan({}, cache) == "no door is known yet"
    assert "no running bundle" in str(plan({"d1": 1, "d2": None}, cache))
    assert "bundle 1 has no gallery export record" in str(plan({"d1": 1}, cache))

    when = utcnow()
    (root / "1" / EXPORT_JSON).write_text(json.dumps({"exported_at": when.isoformat()}))
    found = plan({"d1": 1, "d2": 1}, cache)
    assert not isinstance(found, str)
    assert found.bundle_sequence == 1 and found.coverage[0].persons == {"alice", "bob"}
    # A newer bundle a door may still install counts too, even before any door runs it.
    build_from_gallery_folder(tmp_path, private, 2)
    assert "bundle 2 has no gallery export record" in str(plan({"d1": 1}, cache))
    assert "bundle 9 has no gallery export record" in str(plan({"d1": 9}, cache))
    assert np.isclose(found.coverage[0].exported_at.timestamp(), when.timestamp())
