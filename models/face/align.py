"""Face alignment: a least-squares similarity transform from landmarks to dlib's chip geometry.

The embedder is dlib's ResNet, trained on chips cut by ``dlib.get_face_chip(size=150, padding=0.25)``
from its own 5-point landmarks. We do not run dlib on the device, so we need the position of *our*
landmarks inside dlib's chip. The templates below were measured, not guessed:
``python -m models.convert.align_template`` runs dlib (HOG + shape_predictor_5 + get_face_chip_details)
and our BlazeFace / face mesh on faces that PyPI packages ship (scikit-image's ``lfw_subset`` faces,
``astronaut``, matplotlib's ``grace_hopper``, each also mirrored and slightly rotated and scaled), maps our
landmarks into dlib's chip and takes the per-point median. No CelebA image went into them.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from core.types import Chip, Detection, FloatArray, ImageArray

logger = logging.getLogger(__name__)

CHIP_SIZE = 150
# Fit residual (RMS, chip pixels) at which the quality figure reaches 0; typical frontal faces fit
# within 2-4 px, strong yaw or a bad landmark gives 8+ px.
RESIDUAL_FOR_ZERO_QUALITY_PX = 12.0
# Above this downscale factor the chip is cut from a pyramid level (as dlib does) to avoid aliasing.
MAX_DIRECT_DOWNSCALE = 2.0


class AlignMethod(enum.StrEnum):
    """Which landmarks drive the alignment."""

    KEYPOINTS = "keypoints"  # BlazeFace's 6 keypoints (no extra model)
    MESH = "mesh"  # face-mesh landmarks (one more model run per face)


@dataclass(frozen=True, slots=True)
class Template:
    """Landmark indices and where each lands in the 150x150 dlib chip."""

    indices: tuple[int, ...]
    points: npt.NDArray[np.float64]


# BlazeFace keypoints: right eye, left eye, nose tip, mouth centre (ears are left out: they move with yaw
# and are often hidden). Measured by models/convert/align_template.py (see module docstring).
KEYPOINT_TEMPLATE = Template(
    indices=(0, 1, 2, 3),
    points=np.array([[46.788, 45.586], [102.212, 45.586], [74.5, 75.756], [74.5, 103.288]]),
)
# Face-mesh landmarks: the outer and inner eye corners (33, 133, 362, 263) and the subnasale (2): the
# same anatomy as dlib's 5 points, hence the closest chips to dlib's own. Measured as above.
MESH_TEMPLATE = Template(
    indices=(33, 133, 362, 263, 2),
    points=np.array([[36.145, 45.326], [59.777, 46.906], [89.223, 46.906], [112.855, 45.326],
                     [74.5, 84.626]]),
)
# Chosen by `python -m server.evaluation.align_study` on CelebA training folds only (never 9-10):
# - geometry, folds 1-8 (3134 faces): mean distance of our chip grid from dlib's own chip grid
#   keypoints (eyes, nose, mouth) 4.86 px, mesh (eye corners + subnasale) 2.30 px;
# - dlib's ResNet on our chips, folds 1-4 (2400 pairs): keypoints AUC 0.9933 / EER 0.035 /
#   TAR@1e-2 0.947; mesh AUC 0.9941 / EER 0.0275 / TAR@1e-2 0.952.
# The mesh costs one more ~1-2 ms model run per face and wins on every figure.
DEFAULT_METHOD = AlignMethod.MESH


def similarity_transform(src: npt.NDArray[np.floating], dst: npt.NDArray[np.floating],
                         ) -> tuple[npt.NDArray[np.float64], float]:
    """Least-squares similarity (rotation, uniform scale, translation) src -> dst (Umeyama 1991).

    Returns the 2x3 matrix and the RMS residual in dst units. Needs >= 2 distinct points.
    """
    a = np.asarray(src, np.float64)
    b = np.asarray(dst, np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.shape[1] != 2 or a.shape[0] < 2:
        raise ValueError(f"need matching (K>=2, 2) point sets, got {a.shape} and {b.shape}")
    mean_a, mean_b = a.mean(axis=0), b.mean(axis=0)
    da, db = a - mean_a, b - mean_b
    var_a = float((da**2).sum()) / len(a)
    if var_a <= 1e-12:
        raise ValueError("source points coincide; cannot fit a similarity transform")
    cov = db.T @ da / len(a)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:  # reflection: flip the weakest axis
        sign[1, 1] = -1.0
    rot = u @ sign @ vt
    scale = float(np.trace(np.diag(sig) @ sign)) / var_a
    linear = scale * rot
    matrix = np.hstack([linear, (mean_b - linear @ mean_a)[:, None]])
    residual = a @ linear.T + matrix[:, 2] - b
    rms = float(np.sqrt((residual**2).sum(axis=1).mean()))
    return matrix, rms


def warp_chip(rgb: ImageArray, matrix: npt.NDArray[np.float64], size: int = CHIP_SIZE) -> ImageArray:
    """Cut a size x size chip with a 2x3 image->chip transform; outside the image is black, like dlib."""
    scale = float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))
    image, m = rgb, matrix.copy()
    while scale * MAX_DIRECT_DOWNSCALE < 1.0 and min(image.shape[:2]) >= 2 * size:
        image = np.asarray(cv2.pyrDown(image), np.uint8)  # pyramid level k holds pixel x at x / 2
        m[:, :2] *= 2.0
        scale *= 2.0
    chip = cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=(0, 0, 0))
    return np.ascontiguousarray(chip, dtype=np.uint8)


def chip_quality(rms_px: float, score: float) -> float:
    """Quality in [0, 1]: the detection score discounted by how badly the landmarks fit the template."""
    fit = max(0.0, 1.0 - rms_px / RESIDUAL_FOR_ZERO_QUALITY_PX)
    return float(np.clip(score * fit, 0.0, 1.0))


def align_points(rgb: ImageArray, det: Detection, points: npt.NDArray[np.floating],
                 template: Template) -> Chip:
    """Align with the given landmarks (already in ``template.indices`` order) and cut the chip."""
    pts = np.asarray(points, np.float64)
    if not np.all(np.isfinite(pts)):
        raise ValueError("landmarks contain NaN or inf")
    matrix, rms = similarity_transform(pts, template.points)
    chip = warp_chip(rgb, matrix)
    transform: FloatArray = matrix.astype(np.float32)
    return Chip(rgb=chip, transform=transform, quality=chip_quality(rms, det.score), detection=det)


def align_keypoints(rgb: ImageArray, det: Detection, template: Template = KEYPOINT_TEMPLATE) -> Chip:
    """Align from BlazeFace's keypoints."""
    return align_points(rgb, det, det.keypoints[list(template.indices)], template)


def chip_to_image(chip: Chip, points: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
    """Map (K, 2) chip coordinates back to image pixels through the inverse transform."""
    inverse = cv2.invertAffineTransform(chip.transform.astype(np.float64))
    pts = np.asarray(points, np.float64)
    out: npt.NDArray[np.float64] = pts @ inverse[:, :2].T + inverse[:, 2]
    return out
