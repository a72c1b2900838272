"""Real CelebA faces for the server tests: identities whose photos pass the enrollment gates and that one
cosine threshold separates, with the built pipeline."""

from __future__ import annotations

import csv
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from device.config import QualityConfig
from device.vision.pipeline import FacePipeline
from device.vision.quality import check_enrollment
from models.face.image import decode_image


@dataclass(frozen=True)
class Faces:
    """Gate-passing JPEGs of a few CelebA identities and a tau that separates them."""

    images: dict[str, list[bytes]]
    tau: float

    def of(self, index: int) -> list[bytes]:
        """The photos of the ``index``-th chosen identity."""
        return list(self.images.values())[index]


def embed(pipe: FacePipeline, data: bytes) -> np.ndarray[Any, Any]:
    """The embedding of the single face in an image."""
    faces = pipe.analyze(decode_image(data))
    assert len(faces) == 1
    return np.asarray(faces[0].embedding.vector, np.float32)


def pick_faces(root: Path, pipeline: FacePipeline, identities: int, per_identity: int,
               candidates: int) -> Faces:
    """Identities from ``root/identities.csv`` with ``per_identity`` gate-passing, separable photos each."""
    by_id: dict[str, list[Path]] = {}
    with open(root / "identities.csv", newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            by_id.setdefault(row["identity"], []).append(root / row["path"])
    chosen: dict[str, list[bytes]] = {}
    vectors: dict[str, list[np.ndarray[Any, Any]]] = {}
    for identity, paths in itertools.islice(sorted(by_id.items()), candidates):
        good = []
        for path in sorted(paths):
            data = path.read_bytes()
            if check_enrollment(decode_image(data), pipeline, QualityConfig()).passed:
                good.append(data)
            if len(good) == per_identity:
                break
        if len(good) < per_identity:
            continue
        vecs = [embed(pipeline, d) for d in good]
        same = min(float(a @ b) for a, b in itertools.combinations(vecs, 2))
        cross = max((float(a @ b) for v in vectors.values() for a in v for b in vecs), default=-1.0)
        if same > cross:
            chosen[identity], vectors[identity] = good, vecs
        if len(chosen) == identities:
            break
    assert len(chosen) == identities, "not enough clean CelebA identities passed the gates"
    same_min = min(float(a @ b) for v in vectors.values() for a, b in itertools.combinations(v, 2))
    cross_max = max(float(a @ b) for (_, v1), (_, v2) in itertools.combinations(vectors.items(), 2)
                    for a in v1 for b in v2)
    return Faces(chosen, tau=(same_min + cross_max) / 2)
