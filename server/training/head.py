"""DeepFace-style binary verification head on pairs of precomputed embeddings.

``y = sigmoid(sum_k w_k * phi_k(f(x_i), f(x_j)) + b)`` with either

* ``abs``:  ``phi_k = |f_k(x_i) - f_k(x_j)|`` (DeepFace's weighted L1), or
* ``chi2``: ``phi_k = (f_k(x_i) - f_k(x_j))^2 / (f_k(x_i) + f_k(x_j))``.

DeepFace's features were ReLU outputs, so its chi^2 denominator was positive. Ours are the
components of unit vectors and may be negative. We shift every component by +1 before the
chi^2 (each component of a unit vector lies in [-1, 1], so the shifted values lie in [0, 2] and
are valid "histogram" entries); the difference is unchanged and the denominator becomes
``f_k(x_i) + f_k(x_j) + 2 + eps`` with ``eps`` guarding the single corner a = b = -1. Both
features are symmetric in (i, j), so the head's score does not depend on the pair order.

The head outputs P(same); its logit is what ``score_pairs`` returns for ROC/TAR evaluation,
exactly like a cosine score (higher = more alike).
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import keras
import numpy as np
import numpy.typing as npt
import tensorflow as tf

HeadKind = Literal["abs", "chi2"]
HEAD_KINDS: tuple[str, ...] = get_args(HeadKind)
# Components of unit vectors lie in [-1, 1]; +1 makes them non-negative for the chi^2 histogram form.
CHI2_SHIFT = 1.0
# Keeps the chi^2 denominator away from 0 at the corner where both shifted components are 0.
CHI2_EPS = 1e-6
PACKAGE = "facegate"


class HeadError(ValueError):
    """Bad head configuration or bad pair arrays."""


def pair_features(a: tf.Tensor, b: tf.Tensor, kind: str) -> tf.Tensor:
    """phi(a, b) per component: |a - b| or the shifted chi^2 (see module doc)."""
    diff = a - b
    if kind == "abs":
        return tf.abs(diff)
    if kind == "chi2":
        return tf.square(diff) / (a + b + 2.0 * CHI2_SHIFT + CHI2_EPS)
    raise HeadError(f"unknown head kind {kind!r}; choose one of {', '.join(HEAD_KINDS)}")


@keras.saving.register_keras_serializable(package=PACKAGE)
class PairFeatures(keras.layers.Layer):  # type: ignore[misc]  # keras is untyped
    """Layer computing ``pair_features`` from the two embeddings of a pair."""

    def __init__(self, kind: str = "abs", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if kind not in HEAD_KINDS:
            raise HeadError(f"unknown head kind {kind!r}; choose one of {', '.join(HEAD_KINDS)}")
        self.kind = kind

    def call(self, a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
        """Per-component pair features (B, D)."""
        return pair_features(a, b, self.kind)

    def get_config(self) -> dict[str, Any]:
        """Layer config for save/load."""
        return {**super().get_config(), "kind": self.kind}


def build_head(dim: int = 128, kind: str = "abs") -> keras.Model:
    """Functional model (emb_a, emb_b) -> P(same) with one weight per component and a bias."""
    if dim < 1:
        raise HeadError(f"embedding dim must be >= 1, got {dim}")
    emb_a = keras.Input((dim,), name="emb_a")
    emb_b = keras.Input((dim,), name="emb_b")
    feats = PairFeatures(kind, name="pair_features")(emb_a, emb_b)
    logit = keras.layers.Dense(1, name="weights")(feats)
    prob = keras.layers.Activation("sigmoid", name="p_same")(logit)
    return keras.Model([emb_a, emb_b], prob, name=f"pairs_head_{kind}")


def head_kind(model: keras.Model) -> str:
    """The feature kind of a head built by ``build_head``."""
    layer = model.get_layer("pair_features")
    return str(layer.kind)


def _check_pairs(emb_a: npt.NDArray[Any], emb_b: npt.NDArray[Any]) -> None:
    if emb_a.ndim != 2 or emb_a.shape != emb_b.shape:
        raise HeadError(f"pair embeddings must be two (N, D) arrays of one shape, got {emb_a.shape} "
                        f"and {emb_b.shape}")
    if not (np.all(np.isfinite(emb_a)) and np.all(np.isfinite(emb_b))):
        raise HeadError("pair embeddings contain NaN or infinity")


def head_logits(model: keras.Model, emb_a: npt.NDArray[Any],
                emb_b: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    """The head's logit per pair (monotone in P(same)); use it as the verification score."""
    _check_pairs(emb_a, emb_b)
    weights = model.get_layer("weights")
    feats = pair_features(tf.constant(emb_a, tf.float32), tf.constant(emb_b, tf.float32), head_kind(model))
    logits = weights(feats)
    return np.asarray(logits, dtype=np.float64).reshape(-1)


def train_head(
    model: keras.Model, emb_a: npt.NDArray[Any], emb_b: npt.NDArray[Any], same: npt.NDArray[Any],
    epochs: int, batch_size: int = 256, learning_rate: float = 1e-2,
    validation: tuple[npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[Any]] | None = None,
    callbacks: list[keras.callbacks.Callback] | None = None,
) -> keras.callbacks.History:
    """Compile (Adam + binary cross-entropy) and fit the head on labelled pairs."""
    _check_pairs(emb_a, emb_b)
    labels = np.asarray(same, dtype=np.float32).reshape(-1, 1)
    if labels.shape[0] != emb_a.shape[0]:
        raise HeadError(f"{labels.shape[0]} labels for {emb_a.shape[0]} pairs")
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="binary_crossentropy",
                  metrics=[keras.metrics.AUC(name="auc"), keras.metrics.BinaryAccuracy(name="acc")])
    val = None
    if validation is not None:
        va, vb, vs = validation
        val = ([va, vb], np.asarray(vs, dtype=np.float32).reshape(-1, 1))
    return model.fit([emb_a, emb_b], labels, epochs=epochs, batch_size=batch_size, shuffle=True,
                     validation_data=val, verbose=0, callbacks=callbacks or [])
