"""Installed bundles on disk: staged install, an atomic ``current`` pointer, rollback, crash recovery.

Layout under ``<data_dir>/bundles``::

    staging/<seq>/      being assembled; deleted at start-up (a crash leaves only garbage here)
    installed/<seq>/    verified bundles: bundle.json (manifest + signature), models/, gallery/
    working/<seq>/      the gallery the agent loads: the bundle's gallery plus the latest delta
    downloads/<seq>/    resumable partial downloads (see :mod:`device.bundles.download`)
    current, previous   text files naming a sequence, each replaced atomically (temp, fsync, rename)
    delta.json          the latest accepted signed gallery delta (opened: the door's own copy)
    door.key, gallery_keys.json   this door's X25519 key and its gallery keys (:mod:`device.bundles.doorkey`)

Sealed galleries (the default, ``require_sealed``): a bundle's ``gallery/`` files and a delta's
add/remove travel AES-GCM sealed under the site's gallery key (:mod:`core.gallerycrypto`). Signatures and
sha256s cover the ciphertext, so they are checked first; then the door opens the content with the
gallery key its own wrap gave it (a bundle's plaintext gallery goes to ``installed/<seq>/gallery-open``).
A plaintext gallery is refused as a downgrade (``plaintext_gallery``), and one sealed under a key this
door was never given fails closed (``no_gallery_key``): the running gallery stays as it was.

An install writes and fsyncs every file in ``staging``, re-verifies each sha256 on disk, checks the
gallery belongs to the embedder, runs the self-test, renames the folder into ``installed`` and only
then replaces ``current``. So ``current`` always names a complete, verified bundle: a SIGKILL at
any point leaves the old bundle active or the new one. The previous bundle stays for rollback.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from core.bundle_layout import BUNDLE_JSON, GALLERY_DIR, MODELS_DIR, OPEN_GALLERY_DIR
from core.files import atomic_write_bytes, fsync_dir, sha256_file
from core.gallerycrypto import GalleryCryptoError, file_associated, open_sealed
from core.protocol.schemas import (
    BundleAnnounce,
    BundleManifest,
    GalleryDelta,
    PayloadError,
    canonical_json,
    manifest_bytes,
)
from core.protocol.sealed import open_delta
from device.bundles.doorkey import DoorKeys
from device.bundles.errors import BundleRejected, RejectCode
from device.bundles.selftest import SelfTester, SelfTestError, run_selftest
from device.bundles.signing import SignatureError, verify
from device.bundles.working import DeltaOutcome, WorkingGallery
from device.config import GalleryConfig
from device.gallery.store import GalleryError, read_meta

logger = logging.getLogger(__name__)

DELTA_JSON = "delta.json"
CURRENT, PREVIOUS = "current", "previous"
MODELS_PREFIX, GALLERY_PREFIX = "models/", "gallery/"
GALLERY_META = "gallery/gallery.json"
MODELS_MANIFEST = "models/manifest.json"

StepHook = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class ActiveBundle:
    """A verified, installed bundle and the folders the agent loads from."""

    sequence: int
    root: Path
    manifest: BundleManifest
    working_gallery: Path

    @property
    def models_dir(self) -> Path:
        """Folder with the bundle's models/manifest.json."""
        return self.root / MODELS_DIR

    @property
    def gallery_dir(self) -> Path:
        """The bundle's pristine gallery (never modified; deltas go to ``working_gallery``), opened."""
        return gallery_dir(self.root, self.manifest)


def gallery_dir(root: Path, manifest: BundleManifest) -> Path:
    """Where the plaintext gallery of the bundle in ``root`` is: ``gallery-open/`` when it came sealed."""
    return root / (OPEN_GALLERY_DIR if manifest.gallery_key_version is not None else GALLERY_DIR)


def _fsync_tree(root: Path) -> None:
    for folder, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(Path(folder) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(folder))


class BundleStore:
    """Installs, verifies, recovers and rolls back bundles under ``root``."""

    def __init__(self, root: Path, public_key: Ed25519PublicKey | None, *,
                 gallery_config: GalleryConfig | None = None, selftest: SelfTester = run_selftest,
                 keep: int = 2, door: DoorKeys | None = None, require_sealed: bool = True) -> None:
        self.root = Path(root)
        self.public_key = public_key
        self.door = door
        # Secure by default: a plaintext gallery is a downgrade. False only for an unencrypted site.
        self.require_sealed = require_sealed
        self.selftest = selftest
        self.keep = max(2, keep)
        for sub in ("staging", "installed", "working", "downloads"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.working = WorkingGallery(self.root / "working", gallery_config or GalleryConfig())

    # ------------------------------------------------------------------ pointers

    def _read_pointer(self, name: str) -> int | None:
        try:
            text = (self.root / name).read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            logger.error("bundle pointer %s is unreadable: %s", name, exc)
            return None
        return int(text) if text.isdigit() else None

    def _write_pointer(self, name: str, sequence: int | None) -> None:
        path = self.root / name
        if sequence is None:
            path.unlink(missing_ok=True)
            fsync_dir(self.root)
        else:
            atomic_write_bytes(path, f"{sequence}\n".encode("ascii"))

    @property
    def running_sequence(self) -> int:
        """Sequence named by ``current`` (0 when none)."""
        return self._read_pointer(CURRENT) or 0

    def installed_dir(self, sequence: int) -> Path:
        """Folder of an installed bundle."""
        return self.root / "installed" / str(sequence)

    def downloads_dir(self) -> Path:
        """Parent of the partial downloads."""
        return self.root / "downloads"

    def _load(self, sequence: int) -> ActiveBundle:
        root = self.installed_dir(sequence)
        try:
            announce = BundleAnnounce.parse((root / BUNDLE_JSON).read_bytes())
        except (OSError, PayloadError) as exc:
            raise BundleRejected(RejectCode.CORRUPT, f"installed bundle {sequence}: {exc}") from exc
        return ActiveBundle(sequence, root, announce.manifest, self.working.path(sequence))

    def active(self) -> ActiveBundle | None:
        """The bundle ``current`` names (not re-verified; see :meth:`recover`)."""
        seq = self._read_pointer(CURRENT)
        if seq is None:
            return None
        try:
            return self._load(seq)
        except BundleRejected as exc:
            logger.error("%s", exc)
            return None

    # ------------------------------------------------------------------ gallery delta

    def load_signed_delta(self) -> GalleryDelta | None:
        """The latest accepted gallery delta as it came (signed, sealed), or None."""
        try:
            return GalleryDelta.parse((self.root / DELTA_JSON).read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, PayloadError) as exc:
            logger.error("stored gallery delta is unreadable (%s); waiting for the retained one", exc)
            return None

    def load_delta(self) -> GalleryDelta | None:
        """The latest accepted gallery delta, opened (None when there is none or it no longer opens)."""
        delta = self.load_signed_delta()
        if delta is None or delta.sealed is None:
            return delta
        try:
            return self.open_delta(delta)
        except BundleRejected as exc:
            logger.error("stored gallery delta %d does not open (%s); waiting for the next one", delta.seq,
                         exc)
            return None

    def save_delta(self, delta: GalleryDelta) -> None:
        """Persist an accepted delta as it came (atomically) for restarts and new bundles."""
        atomic_write_bytes(self.root / DELTA_JSON, delta.to_bytes())

    def accept_delta(self, delta: GalleryDelta) -> DeltaOutcome:
        """Verify a delta, open it, rebuild the active working gallery with it, then persist it."""
        if self.public_key is None:
            raise BundleRejected(RejectCode.NO_KEY, "no public key pinned (set bundle.public_key)")
        try:
            verify(self.public_key, delta.signature, canonical_json(delta.signed_part()),
                   f"gallery delta {delta.seq}")
        except SignatureError as exc:
            code = RejectCode.UNSIGNED if not delta.signature else RejectCode.BAD_SIGNATURE
            raise BundleRejected(code, str(exc)) from exc
        current = self.load_signed_delta()
        if current is not None and delta.seq < current.seq:
            raise BundleRejected(RejectCode.REPLAY, f"gallery delta {delta.seq} is older than the applied "
                                 f"delta {current.seq}: replay refused")
        opened = self.open_delta(delta)
        active = self.active()
        if active is None:
            self.save_delta(delta)
            return DeltaOutcome("rejected", "no bundle installed: the delta is kept for the first one")
        outcome = self.working.ensure(active.gallery_dir, active.sequence, active.manifest.embedder_sha256,
                                      opened)
        self.save_delta(delta)
        return outcome or DeltaOutcome("applied")

    def _gallery_key(self, version: int, what: str) -> bytes:
        if self.door is None:
            raise BundleRejected(RejectCode.NO_GALLERY_KEY, f"{what} is sealed and this door has no door key")
        key = self.door.key(version)
        if key is None:
            raise BundleRejected(RejectCode.NO_GALLERY_KEY, f"{what} is sealed under gallery key {version}, "
                                 "which no wrap gave this door (revoked, or its key not yet on the server)")
        return key

    def open_delta(self, delta: GalleryDelta) -> GalleryDelta:
        """The plaintext of a delta whose signature verified; a plaintext one is refused when required."""
        what = f"gallery delta {delta.seq}"
        if delta.sealed is None:
            if self.require_sealed:
                raise BundleRejected(RejectCode.PLAINTEXT, f"{what} is not sealed to this site's doors: "
                                     "downgrade refused (bundle.require_sealed_gallery is on)")
            return delta
        if delta.add or delta.remove or delta.key_version is None:
            raise BundleRejected(RejectCode.MALFORMED, f"{what} mixes sealed and plaintext content")
        if self.door is not None:
            self.door.learn(delta.keys)
        key = self._gallery_key(delta.key_version, what)
        try:
            return open_delta(delta, key)
        except GalleryCryptoError as exc:
            raise BundleRejected(RejectCode.NO_GALLERY_KEY, str(exc)) from exc
        except PayloadError as exc:
            raise BundleRejected(RejectCode.MALFORMED, str(exc)) from exc

    def open_gallery(self, root: Path, manifest: BundleManifest) -> Path:
        """The bundle's plaintext gallery folder: ``gallery/`` as is, or sealed files opened into
        ``gallery-open/`` (call after the sha256s of the ciphertext verified)."""
        version = manifest.gallery_key_version
        if version is None:
            return root / GALLERY_DIR
        seq = manifest.sequence
        key = self._gallery_key(version, f"bundle {seq}")
        dest = root / OPEN_GALLERY_DIR
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(mode=0o700)
        for entry in manifest.files:
            if not entry.path.startswith(GALLERY_PREFIX):
                continue
            name = entry.path[len(GALLERY_PREFIX):]
            try:
                data = open_sealed(key, (root / entry.path).read_bytes(), file_associated(seq, entry.path),
                                   f"bundle {seq} {entry.path}")
            except GalleryCryptoError as exc:
                raise BundleRejected(RejectCode.NO_GALLERY_KEY, str(exc)) from exc
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(target, data, mode=0o600)
        fsync_dir(dest)
        return dest

    # ------------------------------------------------------------------ checks

    def check_announce(self, announce: BundleAnnounce) -> BundleManifest:
        """Signature, replay and consistency checks before anything is downloaded."""
        manifest = announce.manifest
        seq = manifest.sequence
        if self.public_key is None:
            raise BundleRejected(RejectCode.NO_KEY, "no public key pinned (set bundle.public_key)")
        try:
            verify(self.public_key, announce.signature, manifest_bytes(manifest), f"bundle {seq} manifest")
        except SignatureError as exc:
            code = RejectCode.UNSIGNED if not announce.signature else RejectCode.BAD_SIGNATURE
            raise BundleRejected(code, str(exc)) from exc
        running = self.running_sequence
        if seq < running:
            raise BundleRejected(RejectCode.REPLAY, f"bundle {seq} is older than the running bundle "
                                 f"{running}: replay refused")
        active = self.active() if seq == running else None
        if active is not None and manifest_bytes(active.manifest) != manifest_bytes(manifest):
            raise BundleRejected(RejectCode.REPLAY, f"bundle {seq} is already running with a different "
                                 "manifest: a sequence number is never reused")
        if manifest.gallery_key_version is None and self.require_sealed:
            raise BundleRejected(RejectCode.PLAINTEXT, f"bundle {seq}: its gallery is not sealed to this "
                                 "site's doors: downgrade refused (bundle.require_sealed_gallery is on)")
        if manifest.gallery_key_version is not None:
            if self.door is not None:
                self.door.learn(manifest.keys)
            self._gallery_key(manifest.gallery_key_version, f"bundle {seq}")
        if manifest.gallery_model_sha256 != manifest.embedder_sha256:
            raise BundleRejected(RejectCode.GALLERY_MODEL, f"bundle {seq}: gallery built for embedder "
                                 f"{manifest.gallery_model_sha256[:12]}…, bundle embedder is "
                                 f"{manifest.embedder_sha256[:12]}…")
        paths = {f.path: f for f in manifest.files}
        for needed in (GALLERY_META, MODELS_MANIFEST):
            if needed not in paths:
                raise BundleRejected(RejectCode.MALFORMED, f"bundle {seq}: manifest lacks {needed}")
        if not any(f.sha256 == manifest.embedder_sha256 for f in manifest.files):
            raise BundleRejected(RejectCode.MALFORMED, f"bundle {seq}: no file has the embedder sha256")
        if manifest.selftest is None or manifest.selftest.model not in paths:
            raise BundleRejected(RejectCode.MALFORMED, f"bundle {seq}: manifest has no usable self-test")
        return manifest

    def verify_tree(self, root: Path, manifest: BundleManifest) -> None:
        """Every file's size and sha256 on disk, the gallery's embedder, and the self-test."""
        seq = manifest.sequence
        for entry in manifest.files:
            path = root / entry.path
            if not path.is_file():
                raise BundleRejected(RejectCode.TRUNCATED, f"bundle {seq}: {entry.path} is missing")
            size = path.stat().st_size
            if size != entry.size:
                raise BundleRejected(RejectCode.TRUNCATED, f"bundle {seq}: {entry.path} has {size} bytes, "
                                     f"manifest says {entry.size}")
            if sha256_file(path) != entry.sha256:
                raise BundleRejected(RejectCode.TAMPERED, f"bundle {seq}: {entry.path} does not match the "
                                     "sha256 in the signed manifest")
        try:
            meta = read_meta(self.open_gallery(root, manifest))
        except GalleryError as exc:
            raise BundleRejected(RejectCode.MALFORMED, f"bundle {seq}: {exc}") from exc
        if meta.model_sha256 != manifest.embedder_sha256:
            raise BundleRejected(RejectCode.GALLERY_MODEL, f"bundle {seq}: gallery built for embedder "
                                 f"{meta.model_sha256[:12]}…, bundle embedder is "
                                 f"{manifest.embedder_sha256[:12]}…")
        assert manifest.selftest is not None  # noqa: S101 - check_announce refuses bundles without one
        try:
            self.selftest(root, manifest.selftest)
        except SelfTestError as exc:
            raise BundleRejected(RejectCode.SELFTEST, f"bundle {seq}: {exc}") from exc

    # ------------------------------------------------------------------ install / rollback

    def install(self, announce: BundleAnnounce, assemble: Callable[[Path], None], *,
                load_check: Callable[[ActiveBundle], None] | None = None,
                on_step: StepHook | None = None) -> ActiveBundle:
        """Stage, verify, switch ``current`` atomically; roll back when ``load_check`` fails."""
        step = on_step or (lambda _name: None)
        manifest = self.check_announce(announce)
        seq = manifest.sequence
        if seq == self.running_sequence:
            active = self.active()
            if active is not None:
                return active  # already installed: never rebuild the folder that is serving
        staging = self.root / "staging" / str(seq)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        step("staging")
        assemble(staging)
        step("assembled")
        _fsync_tree(staging)
        step("fsynced")
        self.verify_tree(staging, manifest)
        step("verified")
        atomic_write_bytes(staging / BUNDLE_JSON, announce.to_bytes())
        target = self.installed_dir(seq)
        if target.exists():
            shutil.rmtree(target)
        os.rename(staging, target)
        fsync_dir(target.parent)
        step("installed")
        bundle = ActiveBundle(seq, target, manifest, self.working.path(seq))
        self.working.rebuild(bundle.gallery_dir, seq, manifest.embedder_sha256, self.load_delta())
        step("working")
        old = self._read_pointer(CURRENT)
        if old is not None and old != seq:
            self._write_pointer(PREVIOUS, old)
        step("previous")
        self._write_pointer(CURRENT, seq)
        step("switched")
        logger.info("bundle %d is active (previous: %s)", seq, old)
        if load_check is not None:
            try:
                load_check(bundle)
            except Exception as exc:
                self.rollback(f"bundle {seq} failed to load: {type(exc).__name__}: {exc}")
                raise BundleRejected(RejectCode.LOAD_FAILED, f"bundle {seq} failed to load ({exc}); rolled "
                                     f"back to {old}") from exc
        self.gc()
        step("done")
        return bundle

    def rollback(self, reason: str) -> ActiveBundle | None:
        """Make ``previous`` current again (after a failed load); return it, or None if there is none."""
        prev = self._read_pointer(PREVIOUS)
        bad = self._read_pointer(CURRENT)
        logger.error("rolling back bundle %s to %s: %s", bad, prev, reason)
        self._write_pointer(CURRENT, prev)
        self._write_pointer(PREVIOUS, None)
        if bad is not None and bad != prev:
            shutil.rmtree(self.installed_dir(bad), ignore_errors=True)
            self.working.remove(bad)
        return self.active()

    def recover(self) -> ActiveBundle | None:
        """Start-up: drop staging leftovers, re-verify ``current`` (else ``previous``), fix the gallery."""
        for leftover in (self.root / "staging").iterdir():
            shutil.rmtree(leftover, ignore_errors=True)
        delta = self.load_delta()
        for name in (CURRENT, PREVIOUS):
            seq = self._read_pointer(name)
            if seq is None:
                continue
            try:
                bundle = self._load(seq)
                self.verify_tree(bundle.root, bundle.manifest)
                self.working.ensure(bundle.gallery_dir, seq, bundle.manifest.embedder_sha256, delta)
            except (BundleRejected, GalleryError, OSError) as exc:
                logger.error("bundle %d (%s) is unusable: %s", seq, name, exc)
                continue
            if name == PREVIOUS:
                logger.warning("falling back to the previous bundle %d", seq)
                self._write_pointer(CURRENT, seq)
                self._write_pointer(PREVIOUS, None)
            return bundle
        return None

    def gc(self) -> None:
        """Delete installed/working bundles other than current and the ``keep - 1`` newest older ones."""
        cur = self._read_pointer(CURRENT)
        prev = self._read_pointer(PREVIOUS)
        keep = {s for s in (cur, prev) if s is not None}
        installed = sorted((int(p.name) for p in (self.root / "installed").iterdir() if p.name.isdigit()),
                           reverse=True)
        for seq in installed:
            if seq not in keep and len(keep) < self.keep and cur is not None and seq < cur:
                keep.add(seq)
        for seq in installed:
            if seq not in keep:
                shutil.rmtree(self.installed_dir(seq), ignore_errors=True)
        self.working.prune(keep)

