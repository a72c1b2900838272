"""The lever study's pieces on synthetic embeddings: figures per lever, and the camera-like track frames."""

from __future__ import annotations

import numpy as np

from server.evaluation.levers import multi_template_study, one_shot_study
from server.evaluation.tracks import camera_frame

Vectors = dict[str, np.ndarray | None]


def _identities(count: int = 30, photos: int = 6) -> tuple[dict[str, list[str]], Vectors]:
    rng = np.random.default_rng(0)
    identities: dict[str, list[str]] = {}
    vectors: Vectors = {}
    for i in range(count):
        centre = rng.standard_normal(128)
        identities[f"p{i}"] = [f"p{i}/{j}.jpg" for j in range(photos)]
        for path in identities[f"p{i}"]:
            v = centre + 0.7 * rng.standard_normal(128)
            vectors[path] = (v / np.linalg.norm(v)).astype(np.float32)
    vectors["p0/0.jpg"] = None  # a photo without a face
    return identities, vectors


def test_one_shot_and_multi_template_figures() -> None:
    identities, vectors = _identities()
    one = one_shot_study(identities, vectors, draws=3, seed=0)
    expected = {"one-shot", "one-shot+margin", "one-shot+snorm", "one-shot+external-snorm (cohort draw)"}
    assert expected <= set(one)
    for figures in one.values():
        for key, stat in figures.items():
            assert stat["sd"] >= 0.0
            if key in ("0.01", "0.001"):
                assert 0.0 <= stat["mean"] <= 1.0
    assert one["one-shot"]["0.01"]["mean"] <= one["one-shot"]["0.001"]["mean"]
    multi = multi_template_study(identities, vectors, draws=2, seed=0)
    assert set(multi) == {"K=3 max", "K=3 mean", "K=3 mean-score"}
    # three photos beat one on these well-separated identities
    assert multi["K=3 mean"]["0.01"]["mean"] <= one["one-shot"]["0.01"]["mean"] + 1e-9


def test_camera_frames_keep_shape_and_vary() -> None:
    rng = np.random.default_rng(1)
    photo = (np.indices((120, 100)).sum(axis=0) % 255).astype(np.uint8)[:, :, None].repeat(3, axis=2)
    a, b = camera_frame(photo, rng), camera_frame(photo, rng)
    assert a.shape == photo.shape and a.dtype == np.uint8
    assert not np.array_equal(a, b)
