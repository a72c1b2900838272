"""Bundle test harness: build/re-sign bundles, a device (client + store + updater), a server side."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from core.bundle_layout import BUNDLE_JSON, GALLERY_DIR
from core.files import sha256_file
from core.gallerycrypto import file_associated, open_sealed
from core.mqtt.client import ClientSettings, MqttClient
from core.protocol.schemas import BundleAck, BundleAnnounce, BundleFile, BundleManifest, manifest_bytes
from core.protocol.topics import Topics
from device.bundles.doorkey import DoorKeys
from device.bundles.signing import load_public_key
from device.bundles.store import ActiveBundle, BundleStore
from device.bundles.updater import BundleUpdater
from device.config import BundleConfig, GalleryConfig
from device.gallery import Gallery
from server.bundles.builder import BuiltBundle, build_bundle, load_bundle
from server.bundles.publisher import BundleServer
from server.bundles.rollout import DeviceRollout, RolloutTracker
from server.bundles.signing import sign
from tests.mqtt_kit import (
    CONNECT_S,
    STALL_S,
    make_gallery,
    make_models_dir,
    sha_tag,
    unit_vectors,
    wait_until,
)

TOPICS = Topics("facegate", "site")
PERSONS = {"alice": 2, "bob": 1}


def build(tmp: Path, key: Ed25519PrivateKey, sequence: int, persons: dict[str, int] | None = None,
          chunk_size: int = 64 * 1024, tag: str = "m1",
          gallery_config: GalleryConfig | None = None) -> BuiltBundle:
    """A real signed bundle: the test model plus a gallery of ``persons`` embedded 'with' it."""
    work = tmp / f"src-{sequence}-{os.urandom(3).hex()}"
    models, sha = make_models_dir(work / "models", sha_tag(tag))
    gallery = make_gallery(work / "gallery", sha, persons or PERSONS, config=gallery_config)
    return build_bundle(models, gallery, tmp / "bundles", key, sequence=sequence, chunk_size=chunk_size)


def resign(bundle: BuiltBundle, key: Ed25519PrivateKey, dest: Path,
           mutate: Callable[[Path, BundleManifest], BundleManifest] | None = None) -> BuiltBundle:
    """Copy a bundle to ``dest``, let ``mutate`` change files/manifest, refresh file hashes, sign again."""
    shutil.copytree(bundle.path, dest)
    manifest = bundle.manifest
    if mutate is not None:
        manifest = mutate(dest, manifest)
    files = [BundleFile(path=f.path, sha256=sha256_file(dest / f.path), size=(dest / f.path).stat().st_size)
             for f in manifest.files]
    manifest = manifest.model_copy(update={"files": files})
    announce = BundleAnnounce(manifest=manifest, signature=sign(key, manifest_bytes(manifest)))
    (dest / BUNDLE_JSON).write_bytes(announce.to_bytes())
    return BuiltBundle(dest, announce)


def copy_assembler(bundle: BuiltBundle) -> Callable[[Path], None]:
    """An ``assemble`` step that copies the bundle's files (installs without MQTT)."""

    def assemble(dest: Path) -> None:
        for entry in bundle.manifest.files:
            target = dest / entry.path
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(bundle.path / entry.path, target)

    return assemble


def serving(store: BundleStore, person: str = "alice") -> ActiveBundle:
    """Assert the active bundle verifies, passes its self-test and recognises ``person``; return it."""
    active = store.active()
    assert active is not None
    store.verify_tree(active.root, active.manifest)
    gallery = Gallery.open(active.working_gallery, active.manifest.embedder_sha256, GalleryConfig())
    try:
        assert gallery.search(vector_of(person)).person_id == person
    finally:
        gallery.close()
    return active


class Device:
    """A simulated door's bundle side: a real MQTT client, store and updater on its own data folder."""

    def __init__(self, host: str, port: int, device_id: str, data_dir: Path, public_key: str | None,
                 on_installed: Callable[[ActiveBundle], None] | None = None,
                 config: BundleConfig | None = None, *, sealed: bool = False,
                 topics: Topics = TOPICS) -> None:
        self.device_id = device_id
        key = load_public_key(public_key) if public_key else None
        root = data_dir / "bundles"
        # sealed=False: the plaintext bundles these tests build by hand, explicitly allowed.
        self.store = BundleStore(root, key, door=DoorKeys(root, device_id) if sealed else None,
                                 require_sealed=sealed)
        self.store.recover()
        self.client = MqttClient(ClientSettings(host, port, f"dev-{device_id}"))
        self.updater = BundleUpdater(self.client, topics, device_id, self.store,
                                     config or BundleConfig(request_idle_s=0.5), on_installed=on_installed)
        self.updater.start()
        self.client.start()

    def progress(self) -> tuple[object, ...]:
        """What moves while a bundle or delta is on its way: the last ack and the chunks on disk."""
        ack = self.updater.last_ack
        download = self.updater._download  # a test may look inside: the chunk count moves between acks
        return (ack.sequence, ack.state, ack.percent, ack.delta_sequence, ack.delta_state,
                download.received if download is not None else -1)

    def wait(self, predicate: Callable[[BundleAck], bool], timeout: float = STALL_S) -> BundleAck:
        """Wait for an ack state (every ack is looked at, however short-lived) while the device makes
        progress; fail once nothing moved for ``timeout``. Return the ack that matched."""
        matched: list[BundleAck] = []

        def check(ack: BundleAck) -> bool:
            if predicate(ack):
                matched.append(ack)
            return bool(matched)

        while True:
            marker = self.progress()

            def done(ack: BundleAck, marker: tuple[object, ...] = marker) -> bool:
                return check(ack) or self.progress() != marker

            if self.updater.wait_for(done, timeout) and matched:
                return matched[0]
            if not matched and self.progress() == marker:
                raise AssertionError(f"{self.device_id}: no progress for {timeout:.0f} s; "
                                     f"last ack {self.updater.last_ack}")

    def close(self) -> None:
        """Stop like a process would (partial downloads stay on disk)."""
        self.updater.close()
        self.client.close()


class Server:
    """The server's bundle side: a client, the bundle server and the rollout tracker."""

    def __init__(self, host: str, port: int, root: Path) -> None:
        self.client = MqttClient(ClientSettings(host, port, f"server-{os.urandom(3).hex()}")).start()
        assert self.client.wait_connected(CONNECT_S)
        self.bundles = BundleServer(self.client, TOPICS, root).start()
        self.tracker = RolloutTracker(self.client, TOPICS).start()

    def wait(self, predicate: Callable[[dict[str, DeviceRollout]], bool]) -> bool:
        """Wait until ``predicate(fleet)`` holds, while acks keep arriving."""
        return wait_until(lambda: predicate(self.tracker.snapshot()), progress=lambda: self.tracker.updates)

    def close(self) -> None:
        """Disconnect."""
        self.tracker.close()
        self.bundles.close()
        self.client.close()


def vector_of(person: str) -> np.ndarray:
    """The first template of a test person."""
    return unit_vectors(PERSONS[person], list(PERSONS).index(person))[0]


def opened_gallery(bundle: Path, key: bytes, dest: Path) -> Path:
    """A copy of a sealed bundle's gallery, opened with gallery key ``key`` (as a door opens it)."""
    built = load_bundle(bundle)
    seq = built.manifest.sequence
    dest.mkdir(parents=True)
    for entry in built.manifest.files:
        if entry.path.startswith(f"{GALLERY_DIR}/"):
            data = open_sealed(key, (bundle / entry.path).read_bytes(), file_associated(seq, entry.path),
                               entry.path)
            (dest / entry.path[len(GALLERY_DIR) + 1:]).write_bytes(data)
    return dest
