"""The whole face pipeline with the project's built models (detect -> align -> embed)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import matplotlib
import numpy as np
import pytest
from skimage import data as skimage_data

from device.config import DetectorConfig
from device.vision.embedder import Embedder, EmbedderError
from device.vision.pipeline import FacePipeline, FaceResult
from models.face.align import AlignMethod
from models.face.image import ImageError
from models.runtime.manifest import ManifestError, load_manifest

data: Any = skimage_data  # scikit-image's loaders are untyped


@pytest.fixture(scope="module", params=["int8", "float32"])
def pipeline(request: pytest.FixtureRequest, built_models: Path) -> Iterator[FacePipeline]:
    with FacePipeline.from_models_dir(built_models, DetectorConfig(), threads=1,
                                      embedder_variant=request.param) as p:
        yield p


def test_analyze_the_astronaut(pipeline: FacePipeline, built_models: Path) -> None:
    results = pipeline.analyze(data.astronaut())
    assert len(results) == 1
    face = results[0]
    assert isinstance(face, FaceResult)
    assert face.chip.rgb.shape == (150, 150, 3) and face.chip.rgb.dtype == np.uint8
    vec = face.embedding.vector
    assert vec.shape == (128,) and vec.dtype == np.float32
    assert np.linalg.norm(vec) == pytest.approx(1.0, abs=1e-5)
    assert set(face.latencies_ms) == {"detect", "align", "embed"}
    assert all(v >= 0 for v in face.latencies_ms.values())
    entry = next(e for e in load_manifest(built_models).models if e.file == pipeline.embedder.path.name)
    assert entry.role == "embedder"
    assert face.embedding.model_sha256 == entry.sha256 == pipeline.model_sha256
    assert pipeline.model_version == entry.version
    assert pipeline.align_method is AlignMethod.MESH


def test_same_person_scores_higher_than_a_stranger(pipeline: FacePipeline) -> None:
    astronaut = data.astronaut()
    shifted = np.ascontiguousarray(astronaut[10:, 6:])  # same photo, re-framed: same person
    mirrored = np.ascontiguousarray(astronaut[:, ::-1])
    a = pipeline.analyze(astronaut)[0].embedding.vector
    b = pipeline.analyze(shifted)[0].embedding.vector
    c = pipeline.analyze(mirrored)[0].embedding.vector
    hopper = cv2.imread(str(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"))
    assert hopper is not None
    hopper_rgb = np.asarray(cv2.cvtColor(hopper, cv2.COLOR_BGR2RGB), np.uint8)
    other = pipeline.analyze(hopper_rgb)[0].embedding.vector
    assert float(a @ b) > 0.97 and float(a @ c) > 0.95
    # dlib's descriptors are not unit length (norm ~1.4), so its 0.6 distance is a cosine of ~0.91;
    # these two women score ~0.88 with dlib itself
    assert float(a @ other) < min(float(a @ c), 0.91)


def test_stages_compose_like_analyze(pipeline: FacePipeline) -> None:
    img = data.astronaut()
    dets = pipeline.detect(img)
    chip = pipeline.align(img, dets[0])
    emb = pipeline.embed(chip)
    assert np.allclose(emb.vector, pipeline.analyze(img)[0].embedding.vector, atol=1e-6)
    largest = pipeline.largest_chip(img)
    assert largest is not None and np.array_equal(largest.rgb, chip.rgb)


def test_no_face_and_bad_input(pipeline: FacePipeline) -> None:
    assert pipeline.analyze(np.full((200, 300, 3), 40, np.uint8)) == []
    assert pipeline.largest_chip(np.full((200, 300, 3), 40, np.uint8)) is None
    with pytest.raises(ImageError):
        pipeline.analyze(None)  # type: ignore[arg-type]
    with pytest.raises(ImageError):
        pipeline.analyze(np.full((64, 64, 3), np.nan, np.float32))


def test_keypoint_alignment_also_works(built_models: Path) -> None:
    with FacePipeline.from_models_dir(built_models, align_method=AlignMethod.KEYPOINTS) as p:
        face = p.analyze(data.astronaut())[0]
        assert face.chip.rgb.shape == (150, 150, 3)
        assert "keypoints" in p.ident


def test_close_twice(built_models: Path) -> None:
    p = FacePipeline.from_models_dir(built_models)
    p.close()
    p.close()


def test_tampered_model_is_refused(built_models: Path, tmp_path: Path) -> None:
    copy = tmp_path / "models"
    shutil.copytree(built_models, copy)
    entry = load_manifest(copy).get("embedder-int8")
    with open(copy / entry.file, "r+b") as handle:
        handle.seek(entry.size // 2)
        byte = handle.read(1)
        handle.seek(entry.size // 2)
        handle.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ManifestError, match="sha256 mismatch"):
        FacePipeline.from_models_dir(copy)


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="models build"):
        FacePipeline.from_models_dir(tmp_path)


def test_embedder_rejects_non_chips(built_models: Path) -> None:
    with Embedder.from_models_dir(built_models, "int8") as embedder:
        with pytest.raises(EmbedderError, match="150"):
            embedder.vector(np.zeros((100, 100, 3), np.uint8))
    with pytest.raises(EmbedderError, match="unknown"):
        Embedder.from_models_dir(built_models, "int4")  # type: ignore[arg-type]
