"""Track-level fusion: the searched vector is the normalised mean of the track's best-quality frames."""

from __future__ import annotations

import numpy as np
import pytest

from device.config import DecisionConfig
from device.decide.fusion import TrackFusion


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v)).astype(np.float32)


def test_one_frame_is_searched_as_is() -> None:
    fusion = TrackFusion(1)
    v = _unit(np.arange(1.0, 129.0))
    assert fusion.update(7, v, 0.9) is v


def test_mean_of_the_best_frames_per_track() -> None:
    rng = np.random.default_rng(0)
    a, b, c, d = (_unit(rng.standard_normal(128)) for _ in range(4))
    fusion = TrackFusion(2)
    assert np.allclose(fusion.update(1, a, 0.5), a)
    assert np.allclose(fusion.update(1, b, 0.9), _unit(a + b))
    # a worse frame than both kept ones changes nothing; a better one replaces the worst (a)
    assert np.allclose(fusion.update(1, c, 0.1), _unit(a + b))
    assert np.allclose(fusion.update(1, d, 0.95), _unit(b + d))
    # tracks are independent, and an ended track starts afresh
    assert np.allclose(fusion.update(2, c, 0.3), c)
    fusion.end_track(1)
    assert np.allclose(fusion.update(1, c, 0.3), c)
    fused = fusion.update(2, d, 0.3)
    assert np.linalg.norm(fused) == pytest.approx(1.0, abs=1e-6)
    fusion.reset()
    assert np.allclose(fusion.update(2, a, 0.1), a)


def test_frames_must_be_positive_and_config_bounds_it() -> None:
    with pytest.raises(ValueError, match="frames"):
        TrackFusion(0)
    assert DecisionConfig().fuse_frames >= 1
    with pytest.raises(ValueError):
        DecisionConfig(fuse_frames=0)
