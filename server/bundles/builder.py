"""Build a signed bundle: the models of one build plus the gallery embedded with exactly that embedder.

A bundle folder ``<root>/<seq>/`` holds ``models/`` (manifest.json and every model it lists),
``gallery/`` (gallery.json and the data files it names) and ``bundle.json``: the signed
:class:`BundleAnnounce` with every file's sha256 and size, the versions, the creation time, the
monotonic sequence and the self-test vector. The folder is built in a temp folder and renamed.

A bundle whose gallery was exported from the server database also holds ``gallery_export.json``
(server-side only, not in the manifest): when that export started. Gallery delta rebasing
(:mod:`server.bundles.rebase`) needs it; a bundle built from a ``--gallery`` folder has none, so it
never lets the delta drop an add (the folder's provenance is unknown).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from core.bundle_layout import BUNDLE_JSON, GALLERY_DIR, META_NAME, MODELS_DIR
from core.files import atomic_write_bytes, sha256_file
from core.gallerycrypto import file_associated, seal
from core.protocol.schemas import (
    BundleAnnounce,
    BundleFile,
    BundleManifest,
    PayloadError,
    manifest_bytes,
    utcnow,
)
from device.bundles.selftest import SelfTestError, make_spec
from device.bundles.signing import key_id
from device.gallery.store import GalleryError, read_meta
from models.runtime.manifest import (
    MANIFEST_NAME,
    ManifestError,
    ModelEntry,
    load_manifest,
)
from models.runtime.manifest import verify_entry as verify_model
from server.bundles.signing import sign
from server.bundles.sitekeys import GallerySealer

logger = logging.getLogger(__name__)

EXPORT_JSON = "gallery_export.json"
SEQUENCE_FILE = "sequence"
# 256 KiB chunks: ~100 messages for a 25 MB bundle, small enough for any broker's default limits.
DEFAULT_CHUNK_SIZE = 256 * 1024


class BundleBuildError(Exception):
    """The inputs cannot make a valid bundle (missing files, gallery for another model, ...)."""


@dataclass(frozen=True, slots=True)
class BuiltBundle:
    """A bundle on disk."""

    path: Path
    announce: BundleAnnounce

    @property
    def manifest(self) -> BundleManifest:
        """The signed manifest."""
        return self.announce.manifest


def next_sequence(root: Path) -> int:
    """One above every bundle built in ``root`` so far (the high-water mark survives deletions)."""
    seen = [int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit()] if root.is_dir() else []
    try:
        seen.append(int((root / SEQUENCE_FILE).read_text(encoding="ascii").strip()))
    except (FileNotFoundError, ValueError):
        pass
    return max(seen, default=0) + 1


def _choose_embedder(entries: list[ModelEntry], gallery_sha: str, name: str | None) -> ModelEntry:
    embedders = [e for e in entries if e.role == "embedder"]
    if name is not None:
        for entry in embedders:
            if entry.name == name:
                return entry
        raise BundleBuildError(f"no embedder called {name!r} in the models manifest "
                               f"(has {[e.name for e in embedders]})")
    for entry in embedders:
        if entry.sha256 == gallery_sha:
            return entry
    raise BundleBuildError(f"the gallery was embedded with sha256 {gallery_sha[:12]}…, which is none of the "
                           f"embedders {[e.name for e in embedders]}: re-embed the gallery with this build")


def _copy_models(models_dir: Path, dest: Path) -> list[ModelEntry]:
    try:
        manifest = load_manifest(models_dir)
        for entry in manifest.models:
            verify_model(models_dir, entry)
    except ManifestError as exc:
        raise BundleBuildError(str(exc)) from exc
    dest.mkdir(parents=True)
    shutil.copy2(models_dir / MANIFEST_NAME, dest / MANIFEST_NAME)
    for entry in manifest.models:
        target = dest / entry.file
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(models_dir / entry.file, target)
    return list(manifest.models)


def _seal_gallery(folder: Path, sequence: int, sealer: GallerySealer) -> None:
    """Replace every gallery file with its AES-GCM ciphertext under the site's gallery key, in place."""
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = f"{GALLERY_DIR}/{path.relative_to(folder).as_posix()}"
        atomic_write_bytes(path, seal(sealer.key, path.read_bytes(), file_associated(sequence, rel)))


def _copy_gallery(gallery_dir: Path, dest: Path) -> tuple[str, str, list[str]]:
    try:
        meta = read_meta(gallery_dir)
    except GalleryError as exc:
        raise BundleBuildError(str(exc)) from exc
    dest.mkdir(parents=True)
    names = [META_NAME, meta.vectors_file, *([meta.index_file] if meta.index_file else [])]
    for name in names:
        if not (gallery_dir / name).is_file():
            raise BundleBuildError(f"gallery file {gallery_dir / name} is missing")
        shutil.copy2(gallery_dir / name, dest / name)
    return meta.model_sha256, meta.version, sorted(meta.persons)


def _file_list(root: Path) -> list[BundleFile]:
    files = []
    for folder, _dirs, names in os.walk(root):
        for name in names:
            path = Path(folder) / name
            rel = path.relative_to(root).as_posix()
            if rel in (BUNDLE_JSON, EXPORT_JSON):
                continue
            files.append(BundleFile(path=rel, sha256=sha256_file(path), size=path.stat().st_size))
    return sorted(files, key=lambda f: f.path)


def build_bundle(models_dir: Path, gallery_dir: Path, out_root: Path, key: Ed25519PrivateKey, *,
                 sequence: int | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 embedder: str | None = None, exported_at: dt.datetime | None = None,
                 sealer: GallerySealer | None = None) -> BuiltBundle:
    """Copy, seal, hash, self-test, sign; return the new bundle folder ``out_root/<sequence>``.

    ``exported_at``: when the gallery's database export started (recorded for delta rebasing).
    ``sealer``: the site's gallery key and its wraps; the gallery files are sealed under it and the
    manifest (so the signature) covers their ciphertext and the wraps. None: a plaintext gallery, which
    doors refuse unless told otherwise (``bundle.require_sealed_gallery``).
    """
    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    seq = sequence if sequence is not None else next_sequence(out_root)
    if seq < 1:
        raise BundleBuildError(f"sequence must be >= 1, got {seq}")
    final = out_root / str(seq)
    if final.exists():
        raise BundleBuildError(f"bundle {seq} already exists in {out_root}; sequences are never reused")
    tmp = out_root / f".build-{uuid.uuid4().hex[:8]}"
    try:
        entries = _copy_models(Path(models_dir), tmp / MODELS_DIR)
        gallery_sha, gallery_version, persons = _copy_gallery(Path(gallery_dir), tmp / GALLERY_DIR)
        if sealer is not None:
            _seal_gallery(tmp / GALLERY_DIR, seq, sealer)
        chosen = _choose_embedder(entries, gallery_sha, embedder)
        if chosen.sha256 != gallery_sha:
            raise BundleBuildError(f"gallery built for embedder {gallery_sha[:12]}…, not {chosen.name} "
                                   f"({chosen.sha256[:12]}…): re-embed the gallery")
        try:
            selftest = make_spec(tmp, f"models/{chosen.file}")
        except SelfTestError as exc:
            raise BundleBuildError(f"the embedder does not run here: {exc}") from exc
        try:
            manifest = BundleManifest(
                sequence=seq, created=utcnow(), model_version=f"{chosen.name}@{chosen.version}",
                gallery_version=gallery_version, embedder_sha256=chosen.sha256,
                gallery_model_sha256=gallery_sha, files=_file_list(tmp), chunk_size=chunk_size,
                selftest=selftest, gallery_key_version=sealer.version if sealer else None,
                keys=sealer.keys if sealer else [])
        except ValueError as exc:
            raise BundleBuildError(f"invalid bundle manifest: {exc}") from exc
        announce = BundleAnnounce(manifest=manifest, signature=sign(key, manifest_bytes(manifest)),
                                  key_id=key_id(key.public_key()))
        atomic_write_bytes(tmp / BUNDLE_JSON, announce.to_bytes())
        if exported_at is not None:
            # The persons too: a sealed gallery cannot be read back here for delta rebasing.
            record = {"exported_at": exported_at.astimezone(dt.UTC).isoformat(), "source": "database",
                      "persons": persons}
            atomic_write_bytes(tmp / EXPORT_JSON, json.dumps(record).encode("utf-8"))
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_bytes(out_root / SEQUENCE_FILE, f"{seq}\n".encode("ascii"))
    logger.info("bundle %d built in %s: %d files, %.1f MB", seq, final, len(manifest.files),
                manifest.total_size / 1e6)
    return BuiltBundle(final, announce)


def load_bundle(path: Path) -> BuiltBundle:
    """Read a built bundle folder."""
    try:
        announce = BundleAnnounce.parse((Path(path) / BUNDLE_JSON).read_bytes())
    except FileNotFoundError as exc:
        raise BundleBuildError(f"{path} is not a bundle folder (no {BUNDLE_JSON})") from exc
    except (OSError, PayloadError) as exc:
        raise BundleBuildError(f"cannot read {path / BUNDLE_JSON}: {exc}") from exc
    return BuiltBundle(Path(path), announce)


def export_time(path: Path) -> dt.datetime | None:
    """When bundle ``path``'s gallery export from the database started; None if not recorded."""
    try:
        record = json.loads((Path(path) / EXPORT_JSON).read_text(encoding="utf-8"))
        when = dt.datetime.fromisoformat(record["exported_at"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("bundle %s: unreadable %s (%s); treated as not recorded", path, EXPORT_JSON, exc)
        return None
    return when if when.tzinfo is not None else None


def export_persons(path: Path) -> frozenset[str] | None:
    """The persons bundle ``path``'s database export holds; None if the record does not list them."""
    try:
        record = json.loads((Path(path) / EXPORT_JSON).read_text(encoding="utf-8"))
        persons = record["persons"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return frozenset(str(p) for p in persons) if isinstance(persons, list) else None


def read_chunk(bundle: BuiltBundle, file_index: int, index: int) -> bytes:
    """Bytes of one chunk of one file."""
    manifest = bundle.manifest
    entry = manifest.files[file_index]
    with open(bundle.path / entry.path, "rb") as handle:
        handle.seek(index * manifest.chunk_size)
        return handle.read(manifest.chunk_size)


def iter_chunks(bundle: BuiltBundle) -> Iterator[tuple[int, int, int, bytes]]:
    """(file index, chunk index, chunks in file, data) for every chunk, in order."""
    manifest = bundle.manifest
    for file_index, entry in enumerate(manifest.files):
        total = manifest.chunk_count(file_index)
        with open(bundle.path / entry.path, "rb") as handle:
            for index in range(total):
                yield file_index, index, total, handle.read(manifest.chunk_size)
