"""Standalone enrollment: quality gates, then templates into the local gallery (no server needed).

Each photo must pass the same gates the enrollment server runs (``device.vision.quality``): exactly
one face, minimum face size, sharpness, pose and open eyes. Every accepted photo adds one template to
the person; the gallery is saved atomically once, after all photos.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from device.config import DeviceConfig
from device.gallery import Gallery
from device.vision.pipeline import FacePipeline
from device.vision.quality import check_enrollment
from models.face.image import ImageError, decode_image

logger = logging.getLogger(__name__)

PERSON_ID_RE = re.compile(r"^[A-Za-z0-9_.@:-]{1,128}$")
MAX_NAME_LEN = 200


class EnrollmentError(ValueError):
    """The enrollment request itself is invalid (bad id or name)."""


@dataclass(slots=True)
class ImageOutcome:
    """What happened to one enrollment photo."""

    image: str
    accepted: bool
    failures: list[dict[str, Any]] = field(default_factory=list)
    measurements: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-safe summary (measurements only; never pixels or embeddings)."""
        return {"image": self.image, "accepted": self.accepted, "failures": self.failures,
                "measurements": {k: round(v, 3) for k, v in self.measurements.items()}, "error": self.error}


def validate_person(person_id: str, name: str) -> None:
    """Raise EnrollmentError for an unusable person id or name."""
    if not PERSON_ID_RE.fullmatch(person_id):
        raise EnrollmentError(f"person id {person_id!r} must be 1-128 characters of A-Z a-z 0-9 _ . @ : -")
    if not name.strip() or len(name) > MAX_NAME_LEN:
        raise EnrollmentError(f"name must be non-empty and at most {MAX_NAME_LEN} characters")


def assess_image(path: Path, pipeline: FacePipeline, config: DeviceConfig) -> tuple[ImageOutcome, Any]:
    """Gate one photo; return its outcome and, when accepted, its embedding vector."""
    outcome = ImageOutcome(image=str(path), accepted=False)
    try:
        rgb = decode_image(path.read_bytes())
    except (OSError, ImageError) as exc:
        outcome.error = str(exc)
        return outcome, None
    report = check_enrollment(rgb, pipeline, config.quality)
    outcome.measurements = dict(report.measurements)
    outcome.failures = [{"gate": f.gate, "measured": round(f.measured, 3), "limit": f.limit,
                         "message": f.message} for f in report.failures]
    if not report.passed:
        return outcome, None
    faces = pipeline.analyze(rgb)
    if len(faces) != 1:  # the gates saw one face; the analysis must agree
        outcome.error = f"analysis found {len(faces)} faces"
        return outcome, None
    outcome.accepted = True
    return outcome, faces[0].embedding.vector


def enroll(config: DeviceConfig, pipeline: FacePipeline, gallery: Gallery, person_id: str, name: str,
           images: list[Path]) -> list[ImageOutcome]:
    """Gate every photo, add the accepted ones as templates and save the gallery if any was accepted."""
    validate_person(person_id, name)
    outcomes: list[ImageOutcome] = []
    vectors = []
    for path in images:
        outcome, vector = assess_image(path, pipeline, config)
        outcomes.append(outcome)
        if vector is not None:
            vectors.append(vector)
    if vectors:
        gallery.add_person(person_id, name, np.stack(vectors))
        version = gallery.save()
        logger.info("enrolled %s with %d template(s); gallery %s", person_id, len(vectors), version)
    return outcomes
