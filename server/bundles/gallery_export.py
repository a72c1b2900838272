"""The server's gallery for one embedder, written as a device gallery folder: what a bundle ships.

This is the one DB -> ``device.gallery.Gallery`` export: promotion bundles, the demo and the tests all
call it. Every template stored under ``model_sha256`` is decrypted (``server.enrollment.templates``) and
added under its person's id and name; person ids are the server's, so a later gallery delta that
removes a person reaches the same entry on the doors. Flagged (self-inconsistent) templates are
exported like the deltas publish them: the flag is for review in the web station, not a block.

Only templates of one embedder go in: a gallery is valid only for the model that made its vectors. The
folder holds biometric data: it is created mode 0700 and the caller removes it once copied.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.types import FloatArray
from device.config import GalleryConfig
from device.gallery import Gallery, GalleryError
from device.gallery.store import META_NAME, GalleryMeta, read_meta
from device.vision.embedder import EMBEDDING_DIM
from server.crypto import ChipCipher
from server.db.models import Person, Template
from server.enrollment.templates import open_template

logger = logging.getLogger(__name__)

EXPORT_DIR_MODE = 0o700


class GalleryExportError(Exception):
    """The stored templates cannot make a gallery (mixed dimensions, an existing gallery in the way)."""


def export_gallery(session: Session, cipher: ChipCipher, model_sha256: str, dest: Path, *,
                   config: GalleryConfig | None = None, model_version: str = "",
                   overwrite: bool = False) -> GalleryMeta:
    """Write every person's templates of embedder ``model_sha256`` as a new device gallery in ``dest``."""
    dest = Path(dest)
    if (dest / META_NAME).exists() and not overwrite:
        raise GalleryExportError(f"{dest} already holds a gallery; export into a new folder "
                                 "(or pass overwrite=True to replace it)")
    rows = session.execute(
        select(Template, Person.name).join(Person, Person.id == Template.person_id)
        .where(Template.model_sha256 == model_sha256)
        .order_by(Template.person_id, Template.created_at, Template.id)
    ).all()
    dims = {row[0].dim for row in rows}
    if len(dims) > 1:
        raise GalleryExportError(f"templates of embedder {model_sha256[:12]}… have mixed dimensions "
                                 f"{sorted(dims)}; the model sha256 must fix the dimension")
    dim = dims.pop() if dims else EMBEDDING_DIM
    persons: dict[str, tuple[str, list[FloatArray]]] = {}
    for template, name in rows:
        persons.setdefault(template.person_id, (name, []))[1].append(open_template(cipher, template))
    dest.mkdir(parents=True, exist_ok=True, mode=EXPORT_DIR_MODE)
    gallery_config = config or GalleryConfig()
    try:
        with Gallery.create(dest, dim, model_sha256, gallery_config, model_version) as gallery:
            gallery.add_many((pid, name, np.stack(vectors)) for pid, (name, vectors) in persons.items())
            gallery.save()
        meta = read_meta(dest)
    except GalleryError as exc:
        raise GalleryExportError(f"cannot write the gallery in {dest}: {exc}") from exc
    logger.info("gallery %s exported to %s for embedder %s…: %d persons, %d templates", meta.version, dest,
                model_sha256[:12], len(persons), len(rows))
    return meta
