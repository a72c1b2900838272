"""Planar-attack geometry: is the landmark motion over a track explained by a plane?

A printed photo or a phone screen is flat, so the image of its landmarks in any later frame is the image
in the first frame mapped by one homography. A real head is not flat: when it turns, the nose moves
against the face outline (parallax) and no homography explains the motion.

For each later frame of a track we fit, from the first frame's landmarks to that frame's:

- a homography (least-squares DLT on Hartley-normalised points): its RMS residual is the *planar residual*;
- a similarity (rotation, scale, translation): its RMS residual is the *motion* that a flat object could
  also produce by tilting (perspective) or a head by turning. Without such motion nothing can be told
  apart: a still face and a still photo both fit a plane.

Both are divided by the face size (RMS distance of the landmarks from their centroid). Frames whose motion
is below ``min_motion`` are not evidence. The track's score is the median planar residual of the evidence
frames; at or above ``threshold`` the check says live, below it spoof, and with fewer than
``min_frames`` evidence frames it says uncertain.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from core.types import LivenessCheck, LivenessVerdict

CHECK_NAME = "planar"

# A spread of face-mesh indices: outline (jaw, cheeks, temples), forehead, brows, eye corners, nose ridge
# and tip, mouth corners and chin. Dense regions (lips, eyes) are subsampled so that they do not dominate.
PLANAR_MESH_INDICES: tuple[int, ...] = (
    10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377,
    152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109,
    70, 105, 300, 334, 33, 133, 362, 263, 168, 6, 197, 195, 5, 4, 1, 2, 98, 327, 61, 291, 0, 17,
)
# Points needed for a homography fit (8 unknowns) with enough redundancy to have a residual at all.
MIN_POINTS = 6


class PlanarInputError(ValueError):
    """Landmark arrays that cannot be compared (shape mismatch, too few points, not finite)."""


@dataclass(frozen=True, slots=True)
class PlanarParams:
    """Thresholds of the planar check; defaults match ``LivenessConfig``."""

    # Planar residual (fraction of face size) at or above which the motion shows parallax (live).
    threshold: float = 0.015
    # Similarity-fit residual (fraction of face size) a frame needs to count as evidence.
    min_motion: float = 0.02
    # Evidence frames needed for a live/spoof verdict.
    min_frames: int = 3
    # Frames kept per track (the first one is the reference).
    window: int = 30


@dataclass(frozen=True, slots=True)
class FrameFit:
    """Residuals of one frame against the reference: planar (homography) and motion (similarity)."""

    planar: float
    motion: float


def _as_points(points: npt.ArrayLike) -> npt.NDArray[np.float64]:
    arr = np.asarray(points, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] < 2:
        raise PlanarInputError(f"expected (N, 2) points, got shape {arr.shape}")
    arr = arr[:, :2]
    if arr.shape[0] < MIN_POINTS:
        raise PlanarInputError(f"need at least {MIN_POINTS} points, got {arr.shape[0]}")
    if not np.all(np.isfinite(arr)):
        raise PlanarInputError("points contain NaN or inf")
    return arr


def _normaliser(points: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Hartley normalisation: centroid to the origin, mean distance sqrt(2)."""
    centre = points.mean(axis=0)
    spread = float(np.mean(np.linalg.norm(points - centre, axis=1)))
    scale = np.sqrt(2.0) / spread if spread > 0 else 1.0
    return np.array([[scale, 0, -scale * centre[0]], [0, scale, -scale * centre[1]], [0, 0, 1]])


def fit_homography(src: npt.ArrayLike, dst: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Least-squares 3x3 homography taking ``src`` (N, 2) to ``dst`` (N, 2) (normalised DLT, SVD)."""
    a, b = _as_points(src), _as_points(dst)
    if a.shape != b.shape:
        raise PlanarInputError(f"point sets differ in shape: {a.shape} vs {b.shape}")
    ta, tb = _normaliser(a), _normaliser(b)
    ha = np.c_[a, np.ones(len(a))] @ ta.T
    hb = np.c_[b, np.ones(len(b))] @ tb.T
    zeros = np.zeros_like(ha)
    # Two DLT rows per correspondence (x -> u): [0, -w'x, v'x] and [w'x, 0, -u'x] (w' = 1 here).
    rows = np.vstack([np.hstack([zeros, -ha * hb[:, 2:3], ha * hb[:, 1:2]]),
                      np.hstack([ha * hb[:, 2:3], zeros, -ha * hb[:, 0:1]])])
    _, _, vt = np.linalg.svd(rows, full_matrices=False)
    h_norm = vt[-1].reshape(3, 3)
    h: npt.NDArray[np.float64] = np.linalg.inv(tb) @ h_norm @ ta
    return h / h[2, 2] if abs(h[2, 2]) > 1e-12 else h


def apply_homography(h: npt.NDArray[np.float64], points: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Map (N, 2) points through a homography."""
    pts = _as_points(points)
    mapped = np.c_[pts, np.ones(len(pts))] @ h.T
    w = np.where(np.abs(mapped[:, 2:3]) > 1e-12, mapped[:, 2:3], 1e-12)
    out: npt.NDArray[np.float64] = mapped[:, :2] / w
    return out


def fit_similarity(src: npt.ArrayLike, dst: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Least-squares similarity (Umeyama) as a 2x3 matrix taking ``src`` to ``dst``."""
    a, b = _as_points(src), _as_points(dst)
    ca, cb = a.mean(axis=0), b.mean(axis=0)
    da, db = a - ca, b - cb
    u, sig, vt = np.linalg.svd(db.T @ da)
    d = np.diag([1.0, np.sign(np.linalg.det(u @ vt)) or 1.0])
    rot = u @ d @ vt
    var = float((da**2).sum())
    scale = float((sig * np.diag(d)).sum()) / var if var > 0 else 1.0
    out: npt.NDArray[np.float64] = np.hstack([scale * rot, (cb - scale * rot @ ca)[:, None]])
    return out


def face_size(points: npt.ArrayLike) -> float:
    """RMS distance of the landmarks from their centroid (the scale residuals are divided by)."""
    pts = _as_points(points)
    return float(np.sqrt(np.mean(np.sum((pts - pts.mean(axis=0)) ** 2, axis=1))))


def _rms(residuals: npt.NDArray[np.float64]) -> float:
    return float(np.sqrt(np.mean(np.sum(residuals**2, axis=1))))


def frame_fit(reference: npt.ArrayLike, current: npt.ArrayLike) -> FrameFit:
    """Planar and motion residuals of ``current`` against ``reference``, as fractions of the face size."""
    ref, cur = _as_points(reference), _as_points(current)
    size = face_size(cur)
    if size <= 0:
        raise PlanarInputError("degenerate landmarks (all points coincide)")
    planar = apply_homography(fit_homography(ref, cur), ref) - cur
    sim = fit_similarity(ref, cur)
    motion = ref @ sim[:, :2].T + sim[:, 2] - cur
    return FrameFit(planar=_rms(planar) / size, motion=_rms(motion) / size)


class PlanarTrack:
    """Landmarks of one track (first frame = reference) and the check over them."""

    def __init__(self, params: PlanarParams | None = None) -> None:
        self.params = params if params is not None else PlanarParams()
        self._reference: npt.NDArray[np.float64] | None = None
        self._fits: deque[FrameFit] = deque(maxlen=max(self.params.window - 1, 1))

    def add(self, points: npt.ArrayLike) -> FrameFit | None:
        """Add one frame's landmarks (the first becomes the reference); return its fit."""
        pts = _as_points(points)
        if self._reference is None:
            self._reference = pts
            return None
        fit = frame_fit(self._reference, pts)
        self._fits.append(fit)
        return fit

    @property
    def fits(self) -> tuple[FrameFit, ...]:
        """Fits of the frames after the reference, oldest first."""
        return tuple(self._fits)

    def score(self) -> tuple[float | None, int]:
        """(median planar residual of the evidence frames or None, number of evidence frames)."""
        evidence = [f.planar for f in self._fits if f.motion >= self.params.min_motion]
        if not evidence:
            return None, 0
        return float(np.median(evidence)), len(evidence)

    def check(self) -> LivenessCheck:
        """The planar check's score (higher = more parallax = more live) and verdict."""
        value, count = self.score()
        detail = f"evidence_frames={count} frames={len(self._fits) + (self._reference is not None)}"
        if value is None or count < self.params.min_frames:
            return LivenessCheck(CHECK_NAME, value, LivenessVerdict.UNCERTAIN, f"{detail} too_little_motion")
        verdict = LivenessVerdict.LIVE if value >= self.params.threshold else LivenessVerdict.SPOOF
        return LivenessCheck(CHECK_NAME, value, verdict, detail)
