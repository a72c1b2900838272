"""Re-embed the gallery from the stored chips when the embedder changes (a promotion or a rollback).

Chips (aligned faces, lossless PNG, encrypted) are the source of truth; templates are derived, one per
chip and embedder (``uq_template_chip_model``). :func:`reembed_gallery` adds an encrypted template under
the new embedder's sha256 for every chip that has none yet, in batches of one transaction each: a crash
loses at most one batch, and a rerun skips every chip already done.

Retention: templates of earlier embedders are kept until their person is deleted (erasure removes
every template and chip of that person). A rollback then re-points at the kept templates without
re-embedding, and they cost about 0.6 kB each. Quality figures and the review flag describe the
enrollment image, so the new template copies them from the chip's latest template; the
self-consistency score is an enrollment-time figure of the model that computed it and is left empty.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy import exists, func, select

from core.types import FloatArray, ImageArray
from device.vision.embedder import EmbedderError
from facegate.progress import progress_bar
from models.face.image import ImageError, decode_image
from server.crypto import ChipCipher, CryptoError
from server.db.models import Chip, Template
from server.db.session import Database
from server.enrollment.templates import new_template
from server.rowbinding import chip_associated

logger = logging.getLogger(__name__)

# Chips per transaction: a crash or a bad chip loses at most this much work, while the commit cost
# (one fsync in WAL mode) stays far below the ~30-100 ms an int8 embedding takes per chip.
BATCH_SIZE = 64


class ReembedError(Exception):
    """A chip could not be decrypted, decoded or embedded; the batches before it are kept."""


class ChipEmbedder(Protocol):
    """What re-embedding needs of ``device.vision.embedder.Embedder``."""

    @property
    def sha256(self) -> str:
        """sha256 of the model file (the templates' ``model_sha256``)."""

    def vector(self, chip_rgb: ImageArray) -> FloatArray:
        """L2-normalised embedding of a uint8 RGB chip."""


@dataclass(frozen=True, slots=True)
class ReembedReport:
    """How many chips got a new template, and how many already had one for this embedder."""

    model_sha256: str
    chips: int
    embedded: int
    skipped: int


def open_chip(cipher: ChipCipher, chip: Chip) -> ImageArray:
    """The RGB pixels of a stored chip (decrypted, PNG-decoded)."""
    return decode_image(cipher.decrypt(chip.ciphertext, chip_associated(chip.id, chip.person_id)))


def _pending(db: Database, model_sha256: str) -> tuple[int, list[str]]:
    """(all chips, ids of chips without a template for ``model_sha256``), ids sorted."""
    done = exists().where(Template.chip_id == Chip.id, Template.model_sha256 == model_sha256)
    with db.session() as session:
        total = int(session.scalar(select(func.count()).select_from(Chip)) or 0)
        return total, list(session.scalars(select(Chip.id).where(~done).order_by(Chip.id)))


def _embed_batch(db: Database, cipher: ChipCipher, embedder: ChipEmbedder, ids: list[str]) -> int:
    """Add the templates of one batch in one transaction; return how many were added."""
    sha = embedder.sha256
    added = 0
    with db.transaction() as session:
        # Re-checked inside the transaction: a concurrent run may have done some of these chips.
        done = set(session.scalars(select(Template.chip_id).where(Template.chip_id.in_(ids),
                                                                    Template.model_sha256 == sha)))
        latest: dict[str, Template] = {}
        for template in session.scalars(select(Template).where(Template.chip_id.in_(ids))
                                        .order_by(Template.created_at)):
            if template.chip_id is not None:
                latest[template.chip_id] = template
        for chip in session.scalars(select(Chip).where(Chip.id.in_(ids)).order_by(Chip.id)):
            if chip.id in done:
                continue
            try:
                vector = embedder.vector(open_chip(cipher, chip))
            except (CryptoError, ImageError, EmbedderError) as exc:
                raise ReembedError(f"chip {chip.id} of person {chip.person_id} cannot be re-embedded: "
                                   f"{exc}; delete or re-enroll it, then promote again") from exc
            source = latest.get(chip.id)
            session.add(new_template(cipher, person_id=chip.person_id, chip_id=chip.id, model_sha256=sha,
                                     vector=vector, quality=dict(source.quality) if source else {},
                                     flagged=source.flagged if source else False))
            added += 1
    return added


def reembed_gallery(db: Database, cipher: ChipCipher, embedder: ChipEmbedder, *,
                    batch_size: int = BATCH_SIZE, progress: bool = False) -> ReembedReport:
    """Give every stored chip a template under ``embedder.sha256``; idempotent, batch by batch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    total, pending = _pending(db, embedder.sha256)
    logger.info("re-embedding %d of %d chips with embedder %s…", len(pending), total, embedder.sha256[:12])
    embedded = 0
    with progress_bar("re-embedding chips", len(pending), progress, transient=False) as advance:
        for start in range(0, len(pending), batch_size):
            batch = pending[start:start + batch_size]
            embedded += _embed_batch(db, cipher, embedder, batch)
            advance(len(batch))
    report = ReembedReport(embedder.sha256, total, embedded, total - len(pending))
    logger.info("re-embedded %d chips with embedder %s… (%d already had a template)", report.embedded,
                report.model_sha256[:12], report.skipped)
    return report
