"""The converted embedder reproduces dlib's own descriptors (dlib-bin is the reference).

Chips are cut by dlib itself (HOG detector, shape_predictor_5, ``get_face_chip(150, 0.25)``) from
``../shared/data/celeba-faces``; the reference is ``compute_face_descriptor(chip, num_jitters=0)``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.runtime.manifest import load_manifest, verify_entry
from tests.dlib_kit import DlibChips, celeba_dlib_chips, row_cosines

MIN_CHIPS = 200
MAX_ABS_DIFF = 1e-3
MIN_COSINE = 0.9999


@pytest.fixture(scope="module")
def reference(shared_dir: Path) -> DlibChips:
    """dlib chips and descriptors (cached between runs)."""
    pytest.importorskip("dlib", reason="dlib-bin is the reference implementation")
    ref = celeba_dlib_chips(shared_dir)
    assert len(ref.paths) >= MIN_CHIPS, f"only {len(ref.paths)} chips found by dlib"
    return ref


def _check(name: str, out: np.ndarray, ref: DlibChips) -> None:
    diff = np.abs(out - ref.descriptors).max(axis=1)
    cos = row_cosines(out, ref.descriptors)
    worst = int(np.argmax(diff))
    print(f"{name}: N={len(cos)} max|diff|={diff.max():.3g} (chip {ref.paths[worst]}) "
          f"1-min cos={1 - cos.min():.3g} 1-mean cos={1 - cos.mean():.3g}")
    assert diff.max() <= MAX_ABS_DIFF, f"{name}: max abs diff {diff.max():.3g} on {ref.paths[worst]}"
    assert cos.min() >= MIN_COSINE, f"{name}: min cosine {cos.min():.6f}"


def test_keras_rebuild_matches_dlib(reference: DlibChips) -> None:
    """The Keras model rebuilt from the parsed .dat gives dlib's descriptor on every chip."""
    from models.convert.dlib_keras import build_keras_model
    from models.convert.dlib_parse import parse_file
    from models.convert.dlib_spec import face_resnet_spec
    from models.runtime.assets import dlib_model_file

    net = parse_file(dlib_model_file("dlib_face_recognition_resnet_model_v1.dat"), face_resnet_spec())
    model = build_keras_model(net)
    out = model.predict(reference.chips.astype(np.float32), batch_size=16, verbose=0)
    _check("keras float32", out, reference)


def test_float32_tflite_matches_dlib(reference: DlibChips, built_models: Path) -> None:
    """The shipped float32 .tflite gives dlib's descriptor on every chip."""
    from models.convert.export import embed_all

    path = verify_entry(built_models, load_manifest(built_models).get("embedder-float32"))
    _check("tflite float32", embed_all(path, reference.chips.astype(np.float32)), reference)
