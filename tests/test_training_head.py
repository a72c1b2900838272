"""The DeepFace-style pairs head: gradient signs, symmetry and a short fit that separates pairs.

Precise statement tested: for y = sigmoid(sum_k w_k phi_k(a, b) + b0) with phi = |a - b| or the shifted
chi^2, and unit-length a, b,
  dy/da_k = y (1 - y) w_k dphi_k/da_k  and  sign(dphi_k/da_k) = sign(a_k - b_k),
so pushing a_k away from b_k raises y when w_k > 0 and lowers it when w_k < 0; and under binary
cross-entropy dL/dw_k = (y - t) phi_k, so a gradient step on a different pair (t = 0) lowers every w_k
whose phi_k > 0, and a step on a same pair (t = 1) raises it.
"""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from server.training.head import (  # noqa: E402
    HeadError,
    build_head,
    head_logits,
    pair_features,
    train_head,
)

DIM = 8


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.normal(size=(n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _set_weights(model, w: np.ndarray, bias: float) -> None:  # type: ignore[no-untyped-def]
    kernel = w.reshape(DIM, 1).astype(np.float32)
    model.get_layer("weights").set_weights([kernel, np.array([bias], np.float32)])


@pytest.mark.parametrize("kind", ["abs", "chi2"])
def test_output_gradient_sign_follows_weight_and_difference(kind: str) -> None:
    rng = np.random.default_rng(0)
    model = build_head(DIM, kind)
    w = np.array([2.0, -3.0, 1.0, -1.0, 0.5, -0.5, 4.0, -4.0])
    _set_weights(model, w, 0.1)
    a, b = _unit(rng, 16), _unit(rng, 16)
    ta, tb = tf.constant(a), tf.constant(b)
    with tf.GradientTape() as tape:
        tape.watch(ta)
        y = model([ta, tb])
    grad = tape.gradient(y, ta).numpy()
    expected = np.sign(w)[None, :] * np.sign(a - b)
    assert np.array_equal(np.sign(grad), expected)
    if kind == "abs":  # exact value: y (1 - y) w_k sign(a_k - b_k)
        yv = y.numpy()
        np.testing.assert_allclose(grad, yv * (1 - yv) * w[None, :] * np.sign(a - b), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(("label", "direction"), [(0.0, -1.0), (1.0, 1.0)])
def test_bce_step_moves_weights_by_label(label: float, direction: float) -> None:
    rng = np.random.default_rng(1)
    model = build_head(DIM, "abs")
    _set_weights(model, np.zeros(DIM), 0.0)
    a, b = _unit(rng, 4), _unit(rng, 4)
    loss_fn = tf.keras.losses.BinaryCrossentropy()
    with tf.GradientTape() as tape:
        loss = loss_fn(np.full((4, 1), label, np.float32), model([a, b]))
    kernel = model.get_layer("weights").kernel
    grad = tape.gradient(loss, kernel).numpy().ravel()
    # gradient descent moves w by -grad: down for different pairs, up for same pairs
    assert np.all(np.sign(-grad) == direction)


@pytest.mark.parametrize("kind", ["abs", "chi2"])
def test_features_are_symmetric_and_chi2_handles_negative_components(kind: str) -> None:
    a = tf.constant([[-1.0, -0.5, 0.0, 1.0]])
    b = tf.constant([[-1.0, 0.5, 0.0, -1.0]])
    ab, ba = pair_features(a, b, kind).numpy(), pair_features(b, a, kind).numpy()
    np.testing.assert_allclose(ab, ba)
    assert np.all(np.isfinite(ab)) and np.all(ab >= 0)
    if kind == "chi2":  # (a-b)^2 / (a + b + 2): component 1 -> 1 / 2, component 3 -> 4 / 2
        np.testing.assert_allclose(ab[0], [0.0, 0.5, 0.0, 2.0], atol=1e-5)


def test_short_fit_separates_same_from_different_pairs() -> None:
    rng = np.random.default_rng(2)
    centres = _unit(rng, 20)
    def noisy(idx: np.ndarray) -> np.ndarray:
        x = centres[idx] + 0.15 * rng.normal(size=(len(idx), DIM)).astype(np.float32)
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    ids = rng.integers(0, 20, size=400)
    other = (ids + rng.integers(1, 20, size=400)) % 20
    same = (np.arange(400) % 2 == 0)
    a, b = noisy(ids), noisy(np.where(same, ids, other))
    model = build_head(DIM, "abs")
    train_head(model, a, b, same.astype(np.float32), epochs=30, batch_size=64, learning_rate=0.05)
    scores = head_logits(model, a, b)
    assert scores[same].mean() > scores[~same].mean()
    assert np.all(model.get_layer("weights").get_weights()[0].ravel() < 0)  # big difference -> different


def test_bad_pairs_are_domain_errors() -> None:
    model = build_head(DIM)
    with pytest.raises(HeadError, match="one shape"):
        head_logits(model, np.zeros((2, DIM)), np.zeros((3, DIM)))
    with pytest.raises(HeadError, match="NaN"):
        head_logits(model, np.full((1, DIM), np.nan), np.zeros((1, DIM)))
    with pytest.raises(HeadError, match="unknown head kind"):
        build_head(DIM, "cosine")
