"""Enrollment quality gates, shared by the kiosk and the enrollment server.

A template is only as good as its photo, so enrollment refuses a photo unless it shows exactly one
face that is large enough, sharp, roughly frontal and with open eyes. Every failed gate is reported
with what was measured, the limit and by how much it missed.

Head pose from BlazeFace's six keypoints: we fit a scaled-orthographic projection of a 3D model of the
six points (``HEAD_MODEL``) to the detected keypoints by least squares, orthonormalise the fitted
2x3 matrix into a rotation and read yaw and pitch off it. The model is in inter-ocular units (x to the
subject's left = image right, y down, z towards the camera): the x, y of a frontal face come from the
keypoint template in dlib's chip and the depths from the face mesh, measured on packaged faces by
``python -m models.convert.align_template`` (nose tip 0.58 in front of the eyes, ears 0.88 behind).
Turning the head moves the nose sideways against the ears and eyes (yaw); nodding moves the nose and
eyes vertically against the ears (pitch). Positive yaw = the subject turns to their own left; positive
pitch = chin up. The ears are noisy, so expect a few degrees of error; good enough for a 25-30 degree gate.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import cv2
import numpy as np
import numpy.typing as npt

from core.types import Chip, Detection, ImageArray
from device.config import QualityConfig
from models.face.image import as_rgb
from models.face.mesh import LEFT_EYE_EAR, RIGHT_EYE_EAR, MeshResult, eye_aspect_ratio

logger = logging.getLogger(__name__)

# 3D positions of BlazeFace's keypoints (right eye, left eye, nose tip, mouth, right ear, left ear).
HEAD_MODEL = np.array([
    [-0.5, 0.0, 0.0], [0.5, 0.0, 0.0], [0.0, 0.544, 0.576], [0.0, 1.041, 0.208],
    [-1.036, 0.236, -0.881], [1.036, 0.236, -0.881],
])
# Below this mesh face-presence probability the eye measure is not trusted (gate skipped).
MIN_MESH_PRESENCE = 0.5


class QualityFailure(NamedTuple):
    """One failed gate: which, what was measured, the limit, and a message saying by how much."""

    gate: str
    measured: float
    limit: float
    message: str


@dataclass(frozen=True, slots=True)
class QualityReport:
    """Result of the enrollment gates: passed, every failure, and every measurement taken."""

    passed: bool
    failures: list[QualityFailure] = field(default_factory=list)
    measurements: dict[str, float] = field(default_factory=dict)


class EnrollmentPipeline(Protocol):
    """What the gates need from a pipeline (``device.vision.pipeline.FacePipeline`` provides it)."""

    def detect(self, rgb: ImageArray) -> list[Detection]:
        """Faces, best first."""

    def align(self, rgb: ImageArray, det: Detection, mesh: MeshResult | None = None) -> Chip:
        """The aligned chip."""

    def landmarks(self, rgb: ImageArray, det: Detection) -> MeshResult | None:
        """Face-mesh landmarks or None."""


def head_pose_deg(keypoints: npt.NDArray[np.floating]) -> tuple[float, float]:
    """(yaw, pitch) in degrees from the six BlazeFace keypoints (see the module docstring)."""
    observed = np.asarray(keypoints, np.float64).reshape(6, 2)
    model = HEAD_MODEL - HEAD_MODEL.mean(axis=0)
    obs = observed - observed.mean(axis=0)
    projection, *_ = np.linalg.lstsq(model, obs, rcond=None)  # (3, 2): obs ~ model @ projection
    r1, r2 = projection[:, 0], projection[:, 1]
    norm1, norm2 = np.linalg.norm(r1), np.linalg.norm(r2)
    if norm1 <= 0 or norm2 <= 0:
        return 0.0, 0.0
    r1 = r1 / norm1
    r2 = r2 - (r2 @ r1) * r1  # Gram-Schmidt: the image axes are orthogonal in the head frame
    r2 = r2 / max(float(np.linalg.norm(r2)), 1e-12)
    # Image x = r1 . P: a point in front of the face (z > 0) moves right when the head turns left.
    yaw = math.degrees(math.atan2(float(r1[2]), float(r1[0])))
    # Image y = r2 . P: with the chin up the nose (z > 0) moves up, i.e. r2[2] < 0.
    pitch = math.degrees(math.atan2(float(-r2[2]), float(r2[1])))
    return yaw, pitch


def sharpness(chip_rgb: ImageArray) -> float:
    """Variance of the Laplacian of the grey chip: low for blurred or out-of-focus faces."""
    grey = cv2.cvtColor(chip_rgb, cv2.COLOR_RGB2GRAY)
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


def _below(gate: str, measured: float, limit: float, unit: str, what: str) -> QualityFailure:
    return QualityFailure(gate, measured, limit,
                          f"{what} is {measured:.3g}{unit}, {limit - measured:.3g}{unit} below the minimum "
                          f"{limit:.3g}{unit}")


def _above(gate: str, measured: float, limit: float, unit: str, what: str) -> QualityFailure:
    return QualityFailure(gate, measured, limit,
                          f"{what} is {measured:.3g}{unit}, {measured - limit:.3g}{unit} above the maximum "
                          f"{limit:.3g}{unit}")


def check_enrollment(rgb: ImageArray, pipeline: EnrollmentPipeline, cfg: QualityConfig) -> QualityReport:
    """Run every gate on an enrollment photo; the report lists each failure with its margin."""
    image = as_rgb(rgb)
    detections = pipeline.detect(image)
    measurements: dict[str, float] = {"faces": float(len(detections))}
    if len(detections) != 1:
        failure = QualityFailure("face_count", float(len(detections)), 1.0,
                                 f"found {len(detections)} faces; the photo must show exactly one")
        return QualityReport(False, [failure], measurements)
    det = detections[0]
    failures: list[QualityFailure] = []
    measurements["face_px"] = det.width
    if det.width < cfg.min_face_px:
        failures.append(_below("face_size", det.width, cfg.min_face_px, " px", "face width"))
    mesh = pipeline.landmarks(image, det)
    chip = pipeline.align(image, det, mesh)
    measurements["sharpness"] = sharpness(chip.rgb)
    if measurements["sharpness"] < cfg.min_sharpness:
        failures.append(_below("sharpness", measurements["sharpness"], cfg.min_sharpness, "",
                               "sharpness (variance of the Laplacian)"))
    yaw, pitch = head_pose_deg(det.keypoints)
    measurements["yaw_deg"], measurements["pitch_deg"] = yaw, pitch
    if abs(yaw) > cfg.max_yaw_deg:
        failures.append(_above("yaw", abs(yaw), cfg.max_yaw_deg, " deg", "head turn |yaw|"))
    if abs(pitch) > cfg.max_pitch_deg:
        failures.append(_above("pitch", abs(pitch), cfg.max_pitch_deg, " deg", "head tilt |pitch|"))
    if mesh is not None and mesh.presence >= MIN_MESH_PRESENCE:
        ear = min(eye_aspect_ratio(mesh.points, RIGHT_EYE_EAR), eye_aspect_ratio(mesh.points, LEFT_EYE_EAR))
        measurements["eye_aspect_ratio"] = ear
        if ear < cfg.min_eye_aspect_ratio:
            failures.append(_below("eyes_open", ear, cfg.min_eye_aspect_ratio, "", "eye aspect ratio"))
    return QualityReport(not failures, failures, measurements)
