"""Style-transfer costs against a NumPy reference, pre/de-processing, and the projected L-BFGS."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from server.style import costs, lbfgs  # noqa: E402
from server.style.backbones import CAFFE_MEANS_BGR, BackboneError, make_backbone  # noqa: E402
from server.style.params import CostWeights, StyleParams, normalised_layer_weights  # noqa: E402

RNG = np.random.default_rng(1234)


def _np_gram(a: np.ndarray) -> np.ndarray:
    f = a.reshape(-1, a.shape[-1]).astype(np.float64)
    return f.T @ f


def _np_style(a_s: np.ndarray, a_g: np.ndarray) -> float:
    n_h, n_w, n_c = a_g.shape
    return float(np.sum((_np_gram(a_s) - _np_gram(a_g)) ** 2) / (2.0 * n_h * n_w * n_c) ** 2)


@pytest.mark.parametrize("shape", [(4, 6, 3), (7, 5, 16), (1, 1, 2)])
def test_gram_matches_numpy(shape: tuple[int, int, int]) -> None:
    a = RNG.normal(size=shape).astype(np.float32)
    got = costs.gram_matrix(tf.constant(a[None]))
    assert got.shape == (shape[2], shape[2])
    np.testing.assert_allclose(got.numpy(), _np_gram(a), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.numpy(), got.numpy().T, rtol=1e-6)  # symmetric


def test_content_cost_both_normalisations_match_numpy() -> None:
    a_c = RNG.normal(size=(1, 6, 5, 8)).astype(np.float32)
    a_g = RNG.normal(size=(1, 6, 5, 8)).astype(np.float32)
    squared = float(np.sum((a_c.astype(np.float64) - a_g) ** 2))
    course = float(costs.content_cost(tf.constant(a_c), tf.constant(a_g), norm="course"))
    seed = float(costs.content_cost(tf.constant(a_c), tf.constant(a_g), norm="seed"))
    assert course == pytest.approx(squared / (4 * 6 * 5 * 8), rel=1e-5)
    assert seed == pytest.approx(0.5 * squared, rel=1e-5)
    with pytest.raises(ValueError, match="normalisation"):
        costs.content_cost(tf.constant(a_c), tf.constant(a_g), norm="bogus")  # type: ignore[arg-type]


def test_style_costs_match_numpy_and_weighted_sum() -> None:
    shapes = {"a": (8, 8, 4), "b": (4, 4, 6)}
    a_s = {k: RNG.normal(size=v).astype(np.float32) for k, v in shapes.items()}
    a_g = {k: RNG.normal(size=v).astype(np.float32) for k, v in shapes.items()}
    for k in shapes:
        got = float(costs.layer_style_cost(tf.constant(a_s[k]), tf.constant(a_g[k])))
        assert got == pytest.approx(_np_style(a_s[k], a_g[k]), rel=1e-4)
    lambdas = {"a": 0.3, "b": 2.0}
    grams = {k: costs.gram_matrix(tf.constant(v)) for k, v in a_s.items()}
    total = float(costs.style_cost(grams, {k: tf.constant(v) for k, v in a_g.items()}, lambdas))
    expected = sum(lam * _np_style(a_s[k], a_g[k]) for k, lam in lambdas.items())
    assert total == pytest.approx(expected, rel=1e-4)


def test_costs_vanish_for_identical_activations() -> None:
    a = RNG.normal(size=(1, 9, 7, 5)).astype(np.float32)
    for norm in ("seed", "course"):
        assert float(costs.content_cost(tf.constant(a), tf.constant(a), norm=norm)) == 0.0
    assert float(costs.layer_style_cost(tf.constant(a), tf.constant(a))) == 0.0


def test_total_variation_and_total_cost_match_numpy() -> None:
    x = RNG.normal(size=(5, 6, 3)).astype(np.float64)
    expected = (np.abs(np.diff(x, axis=0)).sum() + np.abs(np.diff(x, axis=1)).sum()) / x.size
    assert float(costs.total_variation(tf.constant(x[None], tf.float32))) == pytest.approx(expected, rel=1e-5)
    assert float(costs.total_variation(tf.ones((1, 4, 4, 3)))) == 0.0
    j = costs.total_cost(tf.constant(2.0), tf.constant(3.0), tf.constant(5.0), CostWeights(10.0, 40.0, 0.5))
    assert float(j) == pytest.approx(10 * 2 + 40 * 3 + 0.5 * 5)


def test_shape_mismatch_is_a_clear_error() -> None:
    with pytest.raises(costs.CostShapeError, match="differ"):
        costs.content_cost(tf.zeros((1, 4, 4, 3)), tf.zeros((1, 5, 4, 3)))
    with pytest.raises(costs.CostShapeError, match="batch of one"):
        costs.gram_matrix(tf.zeros((2, 4, 4, 3)))
    with pytest.raises(costs.CostShapeError):
        costs.gram_matrix(tf.zeros((4, 3)))


def test_layer_weights_and_params_validation() -> None:
    assert normalised_layer_weights(["a", "b"], None) == {"a": 0.5, "b": 0.5}
    assert normalised_layer_weights(["a", "b"], [1.0, 3.0]) == {"a": 1.0, "b": 3.0}
    with pytest.raises(ValueError, match="2 style layers but 1"):
        normalised_layer_weights(["a", "b"], [1.0])
    with pytest.raises(ValueError, match="style_weights"):
        StyleParams(style_weights=(1.0,))
    with pytest.raises(ValueError, match="2 style layers but 3"):
        StyleParams(style_layers=("a", "b"), style_weights=(1.0, 2.0, 3.0))
    with pytest.raises(ValueError):
        StyleParams(size=8)
    with pytest.raises(ValueError):
        StyleParams.model_validate({"bogus": 1})


def test_caffe_preprocess_round_trip_and_clipping() -> None:
    net = make_backbone("squeezenet", random_weights=True)
    rgb = RNG.integers(0, 256, size=(9, 11, 3), dtype=np.uint8)
    x = net.preprocess(rgb)
    assert x.shape == (1, 9, 11, 3) and x.dtype == np.float32
    # BGR order, minus the ImageNet means.
    np.testing.assert_allclose(x[0, 0, 0], rgb[0, 0, ::-1].astype(np.float32) - CAFFE_MEANS_BGR, rtol=1e-6)
    np.testing.assert_array_equal(net.deprocess(x), rgb)
    wild = x.copy()
    wild[0, 0, 0] = [-500.0, 500.0, 0.0]
    out = net.deprocess(wild)
    assert out.shape == (9, 11, 3)
    assert out[0, 0].tolist() == [round(123.68), 255, 0]  # R from channel 2, G clipped high, B clipped low
    low, high = net.pixel_bounds()
    np.testing.assert_allclose(net.deprocess(np.broadcast_to(low, (1, 2, 2, 3))), 0)
    np.testing.assert_allclose(net.deprocess(np.broadcast_to(high, (1, 2, 2, 3))), 255)


def test_backbone_registry_errors() -> None:
    with pytest.raises(BackboneError, match="unknown backbone"):
        make_backbone("resnet")
    with pytest.raises(BackboneError, match="needs a weights file"):
        make_backbone("squeezenet")
    with pytest.raises(BackboneError, match="not found"):
        make_backbone("vgg19", weights=__import__("pathlib").Path("/nonexistent/vgg.h5"))


def test_projected_lbfgs_monotone_on_a_boxed_quadratic() -> None:
    scale = RNG.uniform(0.5, 5.0, size=(6, 7)).astype(np.float32)
    target = RNG.uniform(-3, 3, size=(6, 7)).astype(np.float32)
    low, high = np.full_like(target, -1.0), np.full_like(target, 1.0)

    def fun(x: np.ndarray) -> tuple[float, np.ndarray, float]:
        r = x - target
        f = float(0.5 * np.sum(scale * r * r))
        return f, (scale * r).astype(np.float32), f

    seen: list[float] = []
    def record(_: int, __: np.ndarray, f: float) -> bool:
        seen.append(f)
        return False

    out = lbfgs.minimize(fun, np.zeros_like(target), low, high, 200, record)
    assert out.iterations >= 1 and seen
    assert all(b <= a for a, b in itertools.pairwise(seen))
    np.testing.assert_allclose(out.x, np.clip(target, low, high), atol=5e-3)
