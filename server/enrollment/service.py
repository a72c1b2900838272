"""Enrollment: validate uploads, run the quality gates, block duplicates, flag inconsistent templates,
store chips and embeddings (per model version) encrypted, audit the consent, then publish a gallery
delta.

Images are handled by generated ids only; the client's filename is echoed back for display and
never used as a path. Nothing biometric is logged.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import cv2
import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.types import FloatArray, ImageArray
from models.face.image import ImageError, ImageErrorCode, decode_image
from server.audit.log import AuditAction, record
from server.config import ServerConfig
from server.crypto import ChipCipher
from server.db.models import Chip, Person, Template, new_id, utcnow
from server.enrollment.index import EnrollmentIndex, IdentityScore
from server.enrollment.recognition import GateFailure, QualityRejectedError, RecognitionEngine
from server.enrollment.sync import GalleryEntry, GallerySync, SyncError
from server.enrollment.templates import new_template, open_template
from server.rowbinding import chip_associated

logger = logging.getLogger(__name__)

FILENAME_ECHO_MAX = 120


class Outcome(enum.StrEnum):
    """What happened to one image."""

    ACCEPTED = "accepted"
    REJECTED = "rejected"  # quality gates or face count
    DUPLICATE = "duplicate"  # matches another person above the duplicate threshold
    INVALID = "invalid"  # not an image, too large, a decompression bomb, truncated


class EnrollmentErrorKind(enum.StrEnum):
    """Why a whole enrollment request was refused."""

    NOT_FOUND = "not_found"
    NO_CONSENT = "no_consent"
    CONFLICT = "conflict"
    BAD_REQUEST = "bad_request"


class EnrollmentError(Exception):
    """The request as a whole cannot be processed (no consent, unknown person, external id taken)."""

    def __init__(self, kind: EnrollmentErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class UploadedImage:
    """Raw bytes of one upload plus the client's filename (display only)."""

    data: bytes
    filename: str | None = None
    too_large: bool = False


@dataclass(slots=True)
class ImageOutcome:
    """The verdict on one image."""

    index: int
    filename: str | None
    outcome: Outcome
    error: str | None = None
    error_code: str | None = None
    failures: list[GateFailure] = field(default_factory=list)
    duplicate: IdentityScore | None = None
    template_id: str | None = None
    consistency: float | None = None
    flagged: bool = False
    quality: dict[str, float] = field(default_factory=dict)
    vector: FloatArray | None = None
    chip: ImageArray | None = None


@dataclass(slots=True)
class EnrollmentResult:
    """All image verdicts, the person (None when a new person got no accepted image) and the delta."""

    person: Person | None
    images: list[ImageOutcome]
    gallery_sequence: int | None = None

    @property
    def accepted(self) -> int:
        """Number of accepted images."""
        return sum(1 for i in self.images if i.outcome is Outcome.ACCEPTED)


@dataclass(frozen=True, slots=True)
class NewPerson:
    """Identity fields of a person created by this enrollment."""

    name: str
    external_id: str | None
    consent: bool


def _echo(filename: str | None) -> str | None:
    if not filename:
        return None
    return "".join(ch for ch in filename if ch.isprintable())[:FILENAME_ECHO_MAX]


def encode_chip(chip: ImageArray) -> bytes:
    """PNG bytes of an RGB chip (lossless, so re-embedding later sees the same pixels)."""
    ok, buf = cv2.imencode(".png", cv2.cvtColor(chip, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("chip could not be PNG-encoded")
    return bytes(buf.tobytes())


class EnrollmentService:
    """Runs enrollments against one database, engine, cipher and gallery sync."""

    def __init__(self, config: ServerConfig, engine: RecognitionEngine, cipher: ChipCipher,
                 index: EnrollmentIndex, sync: GallerySync) -> None:
        self.config = config
        self.engine = engine
        self.cipher = cipher
        self.index = index
        self.sync = sync
        # Called with every finished enrollment (the metrics count them); must not raise or block.
        self.observers: list[Callable[[EnrollmentResult], None]] = []

    def _finished(self, result: EnrollmentResult) -> EnrollmentResult:
        for observer in self.observers:
            try:
                observer(result)
            except Exception:  # an observer must never fail an enrollment that is already stored
                logger.exception("enrollment observer failed")
        return result

    def _analyze(self, index: int, upload: UploadedImage) -> ImageOutcome:
        result = ImageOutcome(index=index, filename=_echo(upload.filename), outcome=Outcome.INVALID)
        limits = self.config.upload
        try:
            if upload.too_large:
                raise ImageError(ImageErrorCode.TOO_LARGE,
                                 f"image file is larger than the limit of {limits.max_bytes} bytes")
            rgb = decode_image(upload.data, max_bytes=limits.max_bytes, max_pixels=limits.max_pixels)
        except ImageError as exc:
            result.error, result.error_code = str(exc), exc.code.value
            return result
        try:
            sample = self.engine.enrollment_sample(rgb)
        except QualityRejectedError as exc:
            result.outcome, result.failures, result.error = Outcome.REJECTED, exc.failures, str(exc)
            return result
        result.outcome, result.vector, result.chip = Outcome.ACCEPTED, sample.vector, sample.chip
        result.quality = sample.quality
        return result

    def enroll(self, session: Session, actor: str, images: list[UploadedImage], *,
               person_id: str | None = None, new_person: NewPerson | None = None,
               override_duplicate: bool = False, source: str = "upload") -> EnrollmentResult:
        """Enroll ``images`` for an existing person or a new one; commits and publishes on success."""
        person = self._target(session, actor, person_id, new_person)
        outcomes = [self._analyze(i, upload) for i, upload in enumerate(images)]
        accepted = [o for o in outcomes if o.outcome is Outcome.ACCEPTED]
        if not accepted:
            session.rollback()
            return self._finished(EnrollmentResult(person if person_id else None, outcomes))
        model = self.engine.model_sha256
        overrides = self._duplicates(session, model, accepted, person_id, override_duplicate)
        accepted = [o for o in accepted if o.outcome is Outcome.ACCEPTED]
        if not accepted:
            session.rollback()
            return self._finished(EnrollmentResult(person if person_id else None, outcomes))
        if person_id is None:
            session.add(person)
            session.flush()
            record(session, actor, AuditAction.PERSON_CREATED, f"created person {person.name!r}",
                   person_id=person.id, subject=person.name, consent=person.consent)
        self._consistency(session, model, person.id, accepted)
        entries = [self._store(session, person, model, o, source) for o in accepted]
        flagged = sum(1 for o in accepted if o.flagged)
        record(session, actor, AuditAction.ENROLLED,
               f"enrolled {len(accepted)} template(s) of {person.name!r} from {source}"
               f" ({flagged} flagged as inconsistent), consent={'yes' if person.consent else 'no'}",
               person_id=person.id, subject=person.name, consent=person.consent,
               data={"templates": [o.template_id for o in accepted], "model_sha256": model,
                     "source": source})
        for dup in overrides:
            record(session, actor, AuditAction.DUPLICATE_OVERRIDE,
                   f"admin override: {person.name!r} enrolled although a face matched person "
                   f"{dup.person_id} ({dup.name!r}) at {dup.score:.3f}",
                   person_id=person.id, subject=person.name,
                   data={"other_person": dup.person_id, "score": dup.score})
        session.commit()
        self.index.invalidate()
        result = EnrollmentResult(person, outcomes)
        try:
            result.gallery_sequence = self.sync.publish_add(model, entries)
        except SyncError as exc:
            logger.warning("gallery delta for person %s not published: %s", person.id, exc)
        return self._finished(result)

    def _target(self, session: Session, actor: str, person_id: str | None,
                new_person: NewPerson | None) -> Person:
        if person_id is not None:
            person = session.get(Person, person_id)
            if person is None:
                raise EnrollmentError(EnrollmentErrorKind.NOT_FOUND, f"person {person_id} does not exist")
        elif new_person is not None:
            if new_person.external_id is not None and session.scalar(
                select(Person.id).where(Person.external_id == new_person.external_id)
            ):
                raise EnrollmentError(EnrollmentErrorKind.CONFLICT,
                                      f"external id {new_person.external_id!r} is already used")
            person = Person(id=new_id(), name=new_person.name, external_id=new_person.external_id,
                            consent=new_person.consent, created_by=actor,
                            consent_at=utcnow() if new_person.consent else None)
        else:
            raise EnrollmentError(EnrollmentErrorKind.BAD_REQUEST,
                                  "either person_id or new_person is required")
        if self.config.recognition.require_consent and not person.consent:
            raise EnrollmentError(EnrollmentErrorKind.NO_CONSENT,
                                  "enrollment needs the person's recorded consent (consent=true)")
        return person

    def _duplicates(self, session: Session, model: str, accepted: list[ImageOutcome],
                    person_id: str | None, override: bool) -> list[IdentityScore]:
        """Mark images matching another person as duplicates unless overridden; return the overrides."""
        threshold = self.config.recognition.duplicate_threshold
        overrides: list[IdentityScore] = []
        for outcome in accepted:
            if outcome.vector is None:
                continue
            hits = self.index.search(session, model, outcome.vector, k=1, exclude_person=person_id)
            if hits and hits[0].score >= threshold:
                outcome.duplicate = hits[0]
                if override:
                    overrides.append(hits[0])
                else:
                    outcome.outcome = Outcome.DUPLICATE
                    outcome.error = (
                        f"this face matches existing person {hits[0].name!r} (score {hits[0].score:.3f} "
                        f">= {threshold:.3f}); an admin may override if they are different people"
                    )
        return overrides

    def _consistency(self, session: Session, model: str, person_id: str,
                     accepted: list[ImageOutcome]) -> None:
        """Flag templates whose mean cosine to the person's other templates is below the threshold."""
        threshold = self.config.recognition.consistency_threshold
        existing = [
            open_template(self.cipher, t)
            for t in session.query(Template).filter_by(person_id=person_id, model_sha256=model)
        ]
        vectors = [o.vector for o in accepted if o.vector is not None]
        for i, outcome in enumerate(accepted):
            if outcome.vector is None:
                continue
            others = existing + [v for j, v in enumerate(vectors) if j != i]
            if not others:
                continue
            score = float(np.mean(np.stack(others) @ outcome.vector))
            outcome.consistency = score
            outcome.flagged = score < threshold

    def _store(self, session: Session, person: Person, model: str, outcome: ImageOutcome,
               source: str) -> GalleryEntry:
        if outcome.vector is None or outcome.chip is None:
            raise EnrollmentError(EnrollmentErrorKind.BAD_REQUEST,
                                  "an accepted image lost its chip or embedding")
        chip_id = new_id()
        height, width = int(outcome.chip.shape[0]), int(outcome.chip.shape[1])
        session.add(Chip(id=chip_id, person_id=person.id, key_id=self.cipher.key_id.hex(), width=width,
                         height=height, source=source,
                         ciphertext=self.cipher.encrypt(encode_chip(outcome.chip),
                                                         chip_associated(chip_id, person.id))))
        template = new_template(self.cipher, person_id=person.id, chip_id=chip_id, model_sha256=model,
                                vector=outcome.vector, quality=outcome.quality,
                                consistency=outcome.consistency, flagged=outcome.flagged)
        session.add(template)
        outcome.template_id = template.id
        return GalleryEntry(template.id, person.id, person.name, outcome.vector)
