"""Who the demo enrolls and which frames each scene shows: CelebA and NUAA from ../shared when present,
else faces that ship in installed packages.

Material is chosen, never invented: the same face pipeline the door runs (and, with liveness on, the
same liveness engine) looks at every candidate image first, and the demo keeps identities and frames
whose expected outcome is unambiguous one frame at a time: the enrolled person's door frames score at
least ``tau`` against their own templates with ``delta`` to spare and below ``tau`` against everyone else
(so they are granted now and unknown once the person is deleted); the stranger's frames score below
``tau`` against every enrolled person. Whether the whole system then delivers those outcomes (upload,
templates, bundle, install, tracking, k-of-n vote, liveness, MQTT, deletion delta) is what the demo shows.
"""

from __future__ import annotations

import csv
import itertools
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from core.types import FloatArray, ImageArray, LivenessVerdict
from device.config import QualityConfig
from device.liveness.base import LivenessEngine
from device.vision.pipeline import FacePipeline
from device.vision.quality import check_enrollment
from models.face.image import ImageError, decode_image
from server.enrollment.service import encode_chip

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
# Templates per enrolled person, door frames per scene, and the fewest door frames a scene may have.
ENROLL_IMAGES = 3
SCENE_FRAMES = 4
MIN_SCENE_FRAMES = 3
# CelebA identities looked at before giving up (each costs ~15 images through the pipeline).
MAX_IDENTITIES = 40
IMAGES_PER_IDENTITY = 12
NUAA_SUBJECT = "0004"  # the subject tests/test_liveness_agent.py uses
LFW_FACES = 100  # skimage's lfw_subset: the first 100 of its 200 25x25 crops are faces
LFW_SIDE_PX = 200  # upscaled so the face clears the detector's and the gates' minimum size


class CastError(Exception):
    """The image set does not hold enough usable faces for the scenes."""


def shared_dir() -> Path:
    """The read-only ../shared folder (``$FACEGATE_SHARED`` wins), as the tests find it."""
    return Path(os.environ.get("FACEGATE_SHARED", REPO.parent / "shared"))


@dataclass(frozen=True, slots=True)
class Face:
    """A door frame with the embedding the door will compute for it."""

    rgb: ImageArray
    vector: FloatArray


@dataclass(slots=True)
class Candidate:
    """One identity's usable material: enrollment photos (bytes as uploaded) and door frames."""

    label: str
    enroll: list[tuple[bytes, FloatArray]] = field(default_factory=list)
    frames: list[Face] = field(default_factory=list)

    @property
    def templates(self) -> list[FloatArray]:
        """The vectors the server will store for this identity."""
        return [vector for _data, vector in self.enroll]


@dataclass(frozen=True, slots=True)
class Enrollee:
    """A person the demo enrolls through the API: name, where the photos come from, photos, door frames."""

    name: str
    label: str
    photos: list[bytes]
    frames: list[ImageArray]


@dataclass(frozen=True, slots=True)
class Cast:
    """Everything the scenes need, and where it came from."""

    source: str
    notes: list[str]
    main: Enrollee  # granted, then deleted and shown again
    others: list[Enrollee]  # enrolled too, so the gallery is not trivial (and the spoof target)
    stranger: Enrollee  # never enrolled: only door frames
    attack: list[ImageArray] | None  # printed-photo frames, None without liveness data
    attack_label: str = ""

    def describe(self) -> str:
        """Who is who, for the console."""
        people = [f"{p.name} = {p.label} (enrolled from {len(p.photos)})" for p in (self.main, *self.others)]
        return "; ".join([*people, f"stranger = {self.stranger.label}"])


class Judge:
    """Runs the door's pipeline (and liveness engine) on candidate images."""

    def __init__(self, pipeline: FacePipeline, quality: QualityConfig, liveness: LivenessEngine | None,
                 tau: float, delta: float) -> None:
        self.pipeline = pipeline
        self.quality = quality
        self.liveness = liveness
        self.tau = tau
        self.delta = delta
        self._track = itertools.count(1_000_000)

    def enrollable(self, data: bytes) -> FloatArray | None:
        """The embedding the server will store for this photo, or None when a gate refuses it."""
        try:
            rgb = decode_image(data)
        except ImageError:
            return None
        if not check_enrollment(rgb, self.pipeline, self.quality).passed:
            return None
        faces = self.pipeline.analyze(rgb)
        return faces[0].embedding.vector if len(faces) == 1 else None

    def frame(self, rgb: ImageArray, live: bool = True) -> Face | None:
        """The frame when it shows exactly one face (that liveness calls live, when ``live``)."""
        faces = self.pipeline.analyze(rgb)
        if len(faces) != 1:
            return None
        if live and self.liveness is not None:
            track = next(self._track)
            result = self.liveness.assess(rgb, faces[0].detection, track, 0.0)
            self.liveness.end_track(track)
            if result.verdict is not LivenessVerdict.LIVE:
                return None
        return Face(rgb, faces[0].embedding.vector)

    def score(self, vector: FloatArray, templates: list[FloatArray]) -> float:
        """Identity score as the gallery computes it: the best cosine over the templates."""
        return max((float(vector @ t) for t in templates), default=-1.0)

    def duplicates(self, candidate: Candidate, enrolled: list[Candidate]) -> bool:
        """True when the server's duplicate check (cosine >= tau) would refuse a photo."""
        return any(self.score(v, other.templates) >= self.tau
                   for v in candidate.templates for other in enrolled)

    def granted_frames(self, person: Candidate, others: list[Candidate]) -> list[Face]:
        """Frames accepted for ``person`` by the open-set rule and below tau for everyone else."""
        keep = []
        for face in person.frames:
            own = self.score(face.vector, person.templates)
            rival = max((self.score(face.vector, o.templates) for o in others), default=-1.0)
            if own >= self.tau and own - rival >= self.delta and rival < self.tau:
                keep.append(face)
        return keep

    def unknown_frames(self, frames: list[Face], enrolled: list[Candidate]) -> list[Face]:
        """Frames below tau for every enrolled person."""
        return [f for f in frames if all(self.score(f.vector, e.templates) < self.tau for e in enrolled)]


def choose(judge: Judge, candidates: Iterable[Candidate],
           fixed: list[Candidate]) -> tuple[Candidate, Candidate, Candidate]:
    """Greedily pick the main person, a second enrollee and a stranger; ``fixed`` are enrolled anyway."""
    main: Candidate | None = None
    other: Candidate | None = None
    stranger: Candidate | None = None
    for cand in candidates:
        enrolled = [*fixed, *(c for c in (main, other) if c is not None)]
        if main is None:
            if cand.enroll and not judge.duplicates(cand, enrolled):
                frames = judge.granted_frames(cand, fixed)
                if len(frames) >= MIN_SCENE_FRAMES:
                    main, cand.frames = cand, frames
            continue
        if other is None:
            if cand.enroll and not judge.duplicates(cand, enrolled):
                frames = judge.granted_frames(main, [*fixed, cand])
                if len(frames) >= MIN_SCENE_FRAMES:
                    other, main.frames = cand, frames
            continue
        frames = judge.unknown_frames(cand.frames, enrolled)
        if len(frames) >= MIN_SCENE_FRAMES:
            stranger, cand.frames = cand, frames
            break
    if main is None or other is None or stranger is None:
        raise CastError("not enough usable faces: need an enrollee with door frames that match, a second "
                        "enrollee and a stranger who matches nobody")
    return main, other, stranger


def enrollee(candidate: Candidate, name: str) -> Enrollee:
    """The API-facing form of a chosen candidate."""
    return Enrollee(name, candidate.label, [data for data, _v in candidate.enroll],
                    [f.rgb for f in candidate.frames[:SCENE_FRAMES]])


# ----------------------------------------------------------------------------- image sets


def celeba_candidates(judge: Judge, root: Path) -> Iterator[Candidate]:
    """CelebA identities in id order: the first gate-passing photos enroll, the rest are door frames."""
    by_id: dict[str, list[Path]] = {}
    with open(root / "identities.csv", newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            by_id.setdefault(row["identity"], []).append(root / row["path"])
    for identity, paths in itertools.islice(sorted(by_id.items()), MAX_IDENTITIES):
        cand = Candidate(f"CelebA identity {identity}")
        for path in sorted(paths)[:IMAGES_PER_IDENTITY]:
            data = path.read_bytes()
            vector = judge.enrollable(data) if len(cand.enroll) < ENROLL_IMAGES else None
            if vector is not None:
                cand.enroll.append((data, vector))
                continue
            face = judge.frame(decode_image(data))
            if face is not None:
                cand.frames.append(face)
        yield cand


def nuaa_paths(root: Path, label: str, subject: str = NUAA_SUBJECT) -> list[Path]:
    """Genuine or attack (printed photo) frames of one NUAA subject, in labels.csv order."""
    with open(root / "labels.csv", newline="", encoding="utf-8") as handle:
        rows = [r for r in csv.DictReader(handle) if r["label"] == label and r["subject"] == subject]
    return [root / r["path"] for r in rows]


def nuaa_subject(judge: Judge, root: Path) -> tuple[Candidate, list[ImageArray]]:
    """The subject enrolled from genuine webcam frames, and frames of their printed photo."""
    cand = Candidate(f"NUAA subject {NUAA_SUBJECT}")
    for path in nuaa_paths(root, "genuine"):
        data = path.read_bytes()
        vector = judge.enrollable(data)
        if vector is not None:
            cand.enroll.append((data, vector))
        if len(cand.enroll) == ENROLL_IMAGES - 1:
            break
    attack = [judge.frame(decode_image(p.read_bytes()), live=False) for p in nuaa_paths(root, "attack")]
    prints = [f.rgb for f in attack if f is not None][:SCENE_FRAMES]
    if not cand.enroll or len(prints) < MIN_SCENE_FRAMES:
        raise CastError(f"NUAA subject {NUAA_SUBJECT} has too few usable genuine or attack frames")
    return cand, prints


def _augmented(base: ImageArray, count: int, seed: int = 0) -> list[ImageArray]:
    """Shifted, zoomed and re-lit copies of one photo, as a camera sees a person for a moment."""
    rng = np.random.default_rng(seed)
    side = min(base.shape[:2])
    out = []
    for _ in range(count):
        crop = int(side * rng.uniform(0.93, 0.98))
        x0, y0 = (int(v) for v in rng.integers(0, side - crop + 1, 2))
        view = cv2.resize(base[y0:y0 + crop, x0:x0 + crop], (400, 400), interpolation=cv2.INTER_AREA)
        gain = float(rng.uniform(0.85, 1.15))
        out.append(np.clip(view.astype(np.float32) * gain, 0, 255).astype(np.uint8))
    return out


def _lfw_frames(face25: ImageArray, count: int) -> list[ImageArray]:
    """A 25x25 grey LFW face upscaled to 200 px on a grey 320 px frame, slightly shifted per frame."""
    face = cv2.resize(face25, (LFW_SIDE_PX, LFW_SIDE_PX), interpolation=cv2.INTER_CUBIC)
    out = []
    for i in range(count):
        frame = np.full((320, 320, 3), 128, np.uint8)
        x0 = y0 = 55 + 3 * i
        frame[y0:y0 + LFW_SIDE_PX, x0:x0 + LFW_SIDE_PX] = face[:, :, None]
        out.append(frame)
    return out


def packaged_candidates(judge: Judge) -> Iterator[Candidate]:
    """scikit-image's astronaut, matplotlib's Grace Hopper, then scikit-image's LFW faces (strangers)."""
    import matplotlib.cbook
    from skimage import data as skimage_data

    skdata: Any = skimage_data  # scikit-image's loaders are untyped
    astronaut = np.ascontiguousarray(skdata.astronaut())
    photo = encode_chip(astronaut)  # lossless PNG of the whole photo
    cand = Candidate("scikit-image astronaut (Eileen Collins)")
    vector = judge.enrollable(photo)
    if vector is not None:
        cand.enroll.append((photo, vector))
    cand.frames = [f for f in (judge.frame(rgb) for rgb in _augmented(astronaut, 2 * SCENE_FRAMES))
                   if f is not None]
    yield cand
    hopper = Path(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).read_bytes()
    cand = Candidate("matplotlib sample Grace Hopper")
    vector = judge.enrollable(hopper)
    if vector is not None:
        cand.enroll.append((hopper, vector))
    yield cand
    faces = (skdata.lfw_subset()[:LFW_FACES] * 255).astype(np.uint8)
    for i, small in enumerate(faces):
        frames = [judge.frame(rgb) for rgb in _lfw_frames(small, SCENE_FRAMES)]
        yield Candidate(f"scikit-image LFW face {i}", frames=[f for f in frames if f is not None])
