"""dlib reference chips for the embedder tests: dlib's own HOG detector, shape_predictor_5,
``get_face_chip(size=150, padding=0.25)`` and ``compute_face_descriptor(chip, num_jitters=0)``.

Computing them takes ~1 minute, so they are cached (outside the repo) in
``$FACEGATE_TEST_CACHE`` or ``<tmp>/facegate-test-cache``, keyed by the image list and dlib version.
"""

from __future__ import annotations

import csv
import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from models.runtime.assets import dlib_model_file

CHIPS_WANTED = 240  # the issue asks for >= 200; HOG misses a few, so ask for more
IMAGES_PER_IDENTITY = 2
HOG_UPSAMPLE = 1


@dataclass(frozen=True)
class DlibChips:
    """Chips (N, 150, 150, 3) uint8 RGB, dlib descriptors (N, 128) float64, and their image paths."""

    chips: npt.NDArray[np.uint8]
    descriptors: npt.NDArray[np.float64]
    paths: list[str]


def cache_dir() -> Path:
    """Where slow test inputs are cached (never inside the repository)."""
    return Path(os.environ.get("FACEGATE_TEST_CACHE", Path(tempfile.gettempdir()) / "facegate-test-cache"))


def _image_list(celeba: Path) -> list[str]:
    per_identity: dict[str, list[str]] = {}
    with open(celeba / "identities.csv", newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            per_identity.setdefault(row["identity"], []).append(row["path"])
    chosen = []
    for identity in sorted(per_identity):
        chosen += sorted(per_identity[identity])[:IMAGES_PER_IDENTITY]
    return chosen


def celeba_dlib_chips(shared: Path, wanted: int = CHIPS_WANTED) -> DlibChips:
    """dlib chips and descriptors of up to ``wanted`` CelebA faces (one face per image), cached."""
    import dlib

    celeba = shared / "data" / "celeba-faces"
    paths = _image_list(celeba)
    key = hashlib.sha256("\n".join([dlib.__version__, str(wanted), *paths]).encode()).hexdigest()[:16]
    cached = cache_dir() / f"celeba-dlib-chips-{key}.npz"
    if cached.is_file():
        data = np.load(cached)
        return DlibChips(data["chips"], data["descriptors"], [str(p) for p in data["paths"]])
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(dlib_model_file("shape_predictor_5_face_landmarks.dat")))
    resnet = dlib_model_file("dlib_face_recognition_resnet_model_v1.dat")
    recognizer = dlib.face_recognition_model_v1(str(resnet))
    chips: list[npt.NDArray[np.uint8]] = []
    descriptors: list[npt.NDArray[np.float64]] = []
    used: list[str] = []
    for rel in paths:
        if len(chips) >= wanted:
            break
        bgr = cv2.imread(str(celeba / rel))
        if bgr is None:
            continue
        rgb = np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
        faces = detector(rgb, HOG_UPSAMPLE)
        if len(faces) == 0:
            continue
        chip = dlib.get_face_chip(rgb, predictor(rgb, faces[0]), size=150, padding=0.25)
        chips.append(np.asarray(chip, np.uint8))
        descriptors.append(np.asarray(recognizer.compute_face_descriptor(chip, num_jitters=0), np.float64))
        used.append(rel)
    result = DlibChips(np.stack(chips), np.stack(descriptors), used)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez_compressed(tmp, chips=result.chips, descriptors=result.descriptors, paths=np.array(used))
    os.replace(tmp, cached)
    return result


def row_cosines(a: npt.NDArray[np.floating], b: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
    """Row-wise cosine similarity."""
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    norms = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    out: npt.NDArray[np.float64] = (a64 * b64).sum(1) / norms
    return out
