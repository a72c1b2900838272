"""Planar-attack geometry: synthetic 3D face clouds vs the same clouds flattened, plus a warped real photo."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from core.types import LivenessVerdict
from device.liveness.planar import (
    PlanarInputError,
    PlanarParams,
    PlanarTrack,
    apply_homography,
    fit_homography,
    fit_similarity,
    frame_fit,
)

FOCAL_PX = 700.0
DISTANCE_MM = 500.0
NOISE_PX = 0.5  # landmark jitter of the mesh on a still face, about 0.25 % of a 200 px face
FRAMES = 10
TRACKS = 40

Points = npt.NDArray[np.float64]


def face_cloud(rng: np.random.Generator, n: int = 58) -> Points:
    """A face-like 3D point set (mm): a half ellipsoid (150 x 200 x 60) with a protruding nose ridge."""
    a, b, c = 75.0, 100.0, 60.0
    pts: list[tuple[float, float, float]] = []
    while len(pts) < n - 6:
        x, y = rng.uniform(-a, a), rng.uniform(-b, b)
        r = (x / a) ** 2 + (y / b) ** 2
        if r < 0.95:
            pts.append((x, y, -c * np.sqrt(1.0 - r)))
    pts += [(0.0, -30.0 + 40.0 * t, -c - 30.0 * t) for t in np.linspace(0.0, 1.0, 4)]
    pts += [(-15.0, 15.0, -c - 5.0), (15.0, 15.0, -c - 5.0)]
    return np.asarray(pts)


def rotation(yaw: float, pitch: float, roll: float) -> Points:
    """Rotation matrix from angles in radians."""
    cy, sy, cp, sp = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch)
    cr, sr = np.cos(roll), np.sin(roll)
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    rz = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    out: Points = rz @ rx @ ry
    return out


def project(points: Points) -> Points:
    """Pinhole projection of camera-frame points (mm) with the face DISTANCE_MM away, into a 640x480 image."""
    q = points + np.array([0.0, 0.0, DISTANCE_MM])
    out: Points = FOCAL_PX * q[:, :2] / q[:, 2:3] + np.array([320.0, 240.0])
    return out


def track_scores(rng: np.random.Generator, flat: bool, max_deg: float, params: PlanarParams) -> list[float]:
    """Planar scores of TRACKS random tracks: random rigid motions of a (flattened) face cloud."""
    scores = []
    for _ in range(TRACKS):
        cloud = face_cloud(rng)
        if flat:
            cloud[:, 2] = cloud[:, 2].min()  # the same points printed on a plane facing the camera
        track = PlanarTrack(params)
        for i in range(FRAMES):
            if i == 0:
                rot, shift = np.eye(3), np.zeros(3)
            else:
                angles = np.radians(rng.uniform(-max_deg, max_deg, 3) * np.array([1.0, 1.0, 0.66]))
                rot, shift = rotation(*angles), rng.uniform(-1, 1, 3) * np.array([30.0, 30.0, 50.0])
            image = project(cloud @ rot.T + shift) + rng.normal(0.0, NOISE_PX, (len(cloud), 2))
            track.add(image)
        value, _ = track.score()
        assert value is not None
        scores.append(value)
    return scores


def test_homography_is_exact_on_a_plane() -> None:
    rng = np.random.default_rng(3)
    src = rng.uniform(0, 200, (30, 2))
    h_true = np.array([[1.1, 0.05, 12.0], [-0.03, 0.95, -7.0], [2e-4, -1e-4, 1.0]])
    dst = apply_homography(h_true, src)
    h = fit_homography(src, dst)
    assert np.allclose(h, h_true, atol=1e-6)
    fit = frame_fit(src, dst)
    assert fit.planar < 1e-8 and fit.motion > 0.01


def test_similarity_recovers_rotation_scale_translation() -> None:
    rng = np.random.default_rng(4)
    src = rng.uniform(0, 100, (20, 2))
    angle, scale = np.radians(20.0), 1.3
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = src @ rot.T + np.array([5.0, -3.0])
    sim = fit_similarity(src, dst)
    assert np.allclose(sim[:, :2], rot, atol=1e-9) and np.allclose(sim[:, 2], [5.0, -3.0], atol=1e-9)
    assert frame_fit(src, dst).motion < 1e-9


def test_synthetic_3d_faces_and_flat_faces_separate() -> None:
    """Residual distributions (printed with -s): flat clouds stay at the noise floor, 3D clouds do not."""
    params = PlanarParams(min_motion=0.0)
    rng = np.random.default_rng(2024)
    real = np.array(track_scores(rng, flat=False, max_deg=15.0, params=params))
    flat = np.array(track_scores(rng, flat=True, max_deg=15.0, params=params))
    for name, values in (("3d", real), ("flat", flat)):
        pct = " ".join(f"p{q}={np.percentile(values, q):.4f}" for q in (0, 5, 50, 95, 100))
        print(f"planar score {name}: {pct}")
    assert flat.max() < PlanarParams().threshold < real.min()
    assert real.min() > 2.0 * flat.max()


def test_track_verdicts() -> None:
    rng = np.random.default_rng(7)
    cloud = face_cloud(rng)
    flat = cloud.copy()
    flat[:, 2] = flat[:, 2].min()
    motions = [rotation(*np.radians(a)) for a in ((0, 0, 0), (12, 0, 0), (-12, 5, 0), (0, -12, 3), (8, 8, 0))]
    for points, expected in ((cloud, LivenessVerdict.LIVE), (flat, LivenessVerdict.SPOOF)):
        track = PlanarTrack()
        for rot in motions:
            track.add(project(points @ rot.T) + rng.normal(0.0, NOISE_PX, (len(points), 2)))
        check = track.check()
        assert check.verdict is expected, check
        assert check.name == "planar" and check.score is not None


def test_still_track_is_uncertain() -> None:
    rng = np.random.default_rng(8)
    image = project(face_cloud(rng))
    track = PlanarTrack()
    assert track.add(image) is None
    for _ in range(5):
        track.add(image + rng.normal(0.0, 0.2, image.shape))
    check = track.check()
    assert check.verdict is LivenessVerdict.UNCERTAIN and "too_little_motion" in check.detail


def test_bad_inputs_raise_domain_errors() -> None:
    with pytest.raises(PlanarInputError, match="at least"):
        frame_fit(np.zeros((3, 2)), np.zeros((3, 2)))
    with pytest.raises(PlanarInputError, match="NaN"):
        frame_fit(np.full((8, 2), np.nan), np.zeros((8, 2)))
    with pytest.raises(PlanarInputError, match="differ"):
        fit_homography(np.zeros((8, 2)), np.zeros((9, 2)))
    with pytest.raises(PlanarInputError, match="degenerate"):
        frame_fit(np.random.default_rng(0).uniform(size=(8, 2)), np.ones((8, 2)))
