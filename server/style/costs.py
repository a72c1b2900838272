"""Gatys et al. costs as TensorFlow ops: content, Gram/style, total variation and their weighted sum.

Import lazily (TensorFlow); the pure-Python weights and names live in ``server.style.params``.

Activations are NHWC with a batch of one (``(1, nH, nW, nC)``) or unbatched (``(nH, nW, nC)``).
"""

from __future__ import annotations

from collections.abc import Mapping

import tensorflow as tf

from server.style.params import CONTENT_NORMS, ContentNorm, CostWeights


class CostShapeError(ValueError):
    """Two activations that must match do not, or an activation is not 3-D/4-D."""


def _hwc(activation: tf.Tensor) -> tf.Tensor:
    """Drop a batch axis of one: the costs are defined for a single image."""
    rank = activation.shape.rank
    if rank == 4:
        if activation.shape[0] not in (1, None):
            raise CostShapeError(f"expected a batch of one image, got shape {activation.shape}")
        return activation[0]
    if rank != 3:
        raise CostShapeError(f"expected an (nH, nW, nC) or (1, nH, nW, nC) activation: {activation.shape}")
    return activation


def _dims(activation: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(nH, nW, nC) as float32 scalars, from the dynamic shape."""
    shape = tf.cast(tf.shape(activation), tf.float32)
    return shape[0], shape[1], shape[2]


def content_cost(a_c: tf.Tensor, a_g: tf.Tensor, norm: ContentNorm = "course") -> tf.Tensor:
    """J_content: "course" = sum((aC-aG)^2) / (4 nH nW nC); "seed" = sum((aC-aG)^2) / 2."""
    a_c, a_g = _hwc(a_c), _hwc(a_g)
    if a_c.shape.is_fully_defined() and a_g.shape.is_fully_defined() and a_c.shape != a_g.shape:
        raise CostShapeError(f"content activations differ: {a_c.shape} vs {a_g.shape}")
    squared = tf.reduce_sum(tf.square(a_c - a_g))
    if norm == "seed":
        return 0.5 * squared
    if norm == "course":
        n_h, n_w, n_c = _dims(a_g)
        return squared / (4.0 * n_h * n_w * n_c)
    raise ValueError(f"content normalisation must be one of {CONTENT_NORMS}, got {norm!r}")


def gram_matrix(activation: tf.Tensor) -> tf.Tensor:
    """The (nC, nC) Gram matrix F^T F of the activation reshaped to F with shape (nH*nW, nC)."""
    hwc = _hwc(activation)
    features = tf.reshape(hwc, (-1, tf.shape(hwc)[-1]))
    return tf.matmul(features, features, transpose_a=True)


def layer_style_cost_from_gram(gram_s: tf.Tensor, a_g: tf.Tensor) -> tf.Tensor:
    """J_style^[l] = sum((G(S) - G(G))^2) / (2 nH nW nC)^2, with G(S) precomputed (it never changes)."""
    a_g = _hwc(a_g)
    n_h, n_w, n_c = _dims(a_g)
    diff = gram_s - gram_matrix(a_g)
    return tf.reduce_sum(tf.square(diff)) / tf.square(2.0 * n_h * n_w * n_c)


def layer_style_cost(a_s: tf.Tensor, a_g: tf.Tensor) -> tf.Tensor:
    """J_style^[l] for one layer from the style image's and the generated image's activations."""
    a_s, a_g = _hwc(a_s), _hwc(a_g)
    if a_s.shape.is_fully_defined() and a_g.shape.is_fully_defined() and a_s.shape != a_g.shape:
        raise CostShapeError(f"style activations differ: {a_s.shape} vs {a_g.shape}")
    return layer_style_cost_from_gram(gram_matrix(a_s), a_g)


def style_cost(
    grams_s: Mapping[str, tf.Tensor], acts_g: Mapping[str, tf.Tensor], weights: Mapping[str, float]
) -> tf.Tensor:
    """J_style = sum_l lambda_l * J_style^[l] over the layers named in ``weights``."""
    total = tf.constant(0.0, tf.float32)
    for name, lam in weights.items():
        total = total + float(lam) * layer_style_cost_from_gram(grams_s[name], acts_g[name])
    return total


def total_variation(image: tf.Tensor) -> tf.Tensor:
    """Anisotropic total variation per value: (sum|dx| + sum|dy|) / (nH nW nC), in the image's units."""
    hwc = _hwc(image)
    n_h, n_w, n_c = _dims(hwc)
    d_y = tf.reduce_sum(tf.abs(hwc[1:, :, :] - hwc[:-1, :, :]))
    d_x = tf.reduce_sum(tf.abs(hwc[:, 1:, :] - hwc[:, :-1, :]))
    return (d_x + d_y) / (n_h * n_w * n_c)


def total_cost(j_content: tf.Tensor, j_style: tf.Tensor, j_tv: tf.Tensor, weights: CostWeights) -> tf.Tensor:
    """J(G) = alpha * J_content + beta * J_style + gamma * TV."""
    return weights.alpha * j_content + weights.beta * j_style + weights.gamma * j_tv
