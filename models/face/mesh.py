"""MediaPipe face mesh (468 landmarks) on a rotated ROI cut around a BlazeFace detection.

The ROI follows MediaPipe's detection-to-ROI rule: a square 1.5x the box's longer side, centred on
the box and rotated so that the eye keypoints are level. The model sees it as a 192x192 RGB
crop in [0, 1] and returns (x, y, z) in crop pixels plus a face-presence logit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import cv2
import numpy as np
import numpy.typing as npt

from core.files import sha256_file
from core.types import Detection, ImageArray
from models.runtime.interpreter import TFLiteModel

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
