"""A signed bundle of the enrolled gallery for one embedder: export, build, sign (the one way to it).

Used by ``facegate bundle build`` (without ``--gallery``) and by the registry's ``build-bundle`` promotion
hook; the registry calls this module, never the other way round.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Protocol

from core.protocol.schemas import utcnow
from device.vision.embedder import EMBEDDER_ENTRIES
from models.runtime.manifest import load_manifest
from server.bundles.builder import build_bundle
from server.bundles.gallery_export import export_gallery
from server.bundles.signing import load_private_key
from server.config import ServerConfig
from server.crypto import ChipCipher
from server.db.session import Database
from server.state import site_keyring

EXPORT_PREFIX = ".gallery-export-"  # the private temp folder of a plain export, removed once bundled


class GallerySource(Protocol):
    """Where the gallery comes from: the server config, its database and the chip key."""

    @property
    def config(self) -> ServerConfig: ...
    @property
    def db(self) -> Database: ...
    def chip_cipher(self) -> ChipCipher: ...


def build_gallery_bundle(ctx: GallerySource, folder: Path, *, key_path: Path | None = None,
                         out_root: Path | None = None, sequence: int | None = None,
                         chunk_size: int | None = None) -> dict[str, Any]:
    """Export the stored gallery for ``folder``'s embedder, build and sign a bundle; return its summary.

    Used by the ``build-bundle`` hook and by ``facegate bundle build`` without ``--gallery``; the
    keyword arguments override the config's signing key, bundles folder, sequence and chunk size.
    """
    entry = load_manifest(folder).get(EMBEDDER_ENTRIES[ctx.config.models.embedder])
    key = load_private_key(key_path or ctx.config.signing_key_path)
    root = out_root or ctx.config.bundles_root
    root.mkdir(parents=True, exist_ok=True)
    # The exported gallery is biometric data: a private temp folder, removed once the bundle holds it.
    with tempfile.TemporaryDirectory(prefix=EXPORT_PREFIX, dir=root) as tmp:
        gallery_dir = Path(tmp) / "gallery"
        # Taken before the export reads anything: whatever was committed earlier is in the gallery.
        exported_at = utcnow()
        with ctx.db.session() as session:
            meta = export_gallery(session, ctx.chip_cipher(), entry.sha256, gallery_dir,
                                  model_version=f"{entry.name}@{entry.version}")
        extra: dict[str, Any] = {} if chunk_size is None else {"chunk_size": chunk_size}
        keyring = site_keyring(ctx.config, ctx.chip_cipher())
        built = build_bundle(folder, gallery_dir, root, key, embedder=entry.name, sequence=sequence,
                             exported_at=exported_at, sealer=keyring.sealer() if keyring else None, **extra)
    m = built.manifest
    return {"sequence": m.sequence, "path": str(built.path), "persons": len(meta.persons),
            "templates": len(meta.template_ids), "model_version": m.model_version,
            "gallery_version": m.gallery_version, "files": len(m.files), "bytes": m.total_size,
            "chunks": m.total_chunks, "gallery_key_version": m.gallery_key_version,
            "wrapped_to": sorted({w.device for w in m.keys})}
