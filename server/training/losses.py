"""FaceNet triplet loss with online miners over a P x K batch, plus the active-triplet fraction.

Embeddings are L2-normalised before any distance is taken, so squared distances lie in [0, 4]
and the margin ``alpha`` is on that scale (FaceNet used 0.2).

Miners return index triplets ``(anchor, positive, negative)`` into the batch:

* ``batch-hard`` (Hermans et al.): one triplet per anchor, its farthest positive and its
  closest negative.
* ``semi-hard`` (FaceNet): every anchor-positive pair, with the closest negative that is still
  farther than the positive (``d_ap < d_an``). When no negative is farther than the positive,
  the farthest negative is used (the least violating one), as TF-Addons does; such a triplet is
  active, so collapse of the embedding still produces gradient.
* ``random``: every anchor-positive pair with a uniformly drawn negative; the baseline that
  shows how quickly random triplets stop teaching.

Anchors without a positive (or without a negative) in the batch produce no triplet.
"""

from __future__ import annotations

from typing import Literal, get_args

import tensorflow as tf

Mining = Literal["batch-hard", "semi-hard", "random"]
MINERS: tuple[str, ...] = get_args(Mining)
Reduction = Literal["sum", "mean"]

# FaceNet's margin on squared distances between unit vectors.
DEFAULT_ALPHA = 0.2
# Distances are clipped at 0 because ||a||^2 + ||b||^2 - 2ab can go slightly negative in float32.
MIN_SQ_DIST = 0.0


class MiningError(ValueError):
    """A miner name is unknown or the batch cannot yield triplets."""


def l2_normalize(embeddings: tf.Tensor) -> tf.Tensor:
    """Rows scaled to unit length (zero rows stay zero)."""
    return tf.math.l2_normalize(tf.cast(embeddings, tf.float32), axis=-1)


def pairwise_sq_distances(embeddings: tf.Tensor) -> tf.Tensor:
    """(B, B) squared Euclidean distances between the rows, clipped at 0, zero on the diagonal."""
    dot = tf.matmul(embeddings, embeddings, transpose_b=True)
    sq = tf.linalg.diag_part(dot)
    dist = tf.expand_dims(sq, 1) - 2.0 * dot + tf.expand_dims(sq, 0)
    dist = tf.maximum(dist, MIN_SQ_DIST)
    return tf.linalg.set_diag(dist, tf.zeros_like(sq))


def _masks(labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Boolean (B, B) masks: positive pairs (same label, i != j) and negative pairs."""
    labels = tf.reshape(labels, [-1])
    same = tf.equal(tf.expand_dims(labels, 1), tf.expand_dims(labels, 0))
    not_self = tf.logical_not(tf.cast(tf.eye(tf.shape(labels)[0]), tf.bool))
    return tf.logical_and(same, not_self), tf.logical_not(same)


def triplet_loss(
    anchor: tf.Tensor, positive: tf.Tensor, negative: tf.Tensor,
    alpha: float = DEFAULT_ALPHA, reduction: Reduction = "sum",
) -> tf.Tensor:
    """Sum (or mean) over triplets of max(|A-P|^2 - |A-N|^2 + alpha, 0) on L2-normalised rows."""
    a, p, n = l2_normalize(anchor), l2_normalize(positive), l2_normalize(negative)
    per_triplet = _per_triplet(a, p, n, alpha)
    return _reduce(per_triplet, reduction)


def _per_triplet(a: tf.Tensor, p: tf.Tensor, n: tf.Tensor, alpha: float) -> tf.Tensor:
    d_ap = tf.reduce_sum(tf.square(a - p), axis=-1)
    d_an = tf.reduce_sum(tf.square(a - n), axis=-1)
    return tf.maximum(d_ap - d_an + alpha, 0.0)


def _reduce(per_triplet: tf.Tensor, reduction: Reduction) -> tf.Tensor:
    if reduction == "sum":
        return tf.reduce_sum(per_triplet)
    if reduction == "mean":
        count = tf.cast(tf.size(per_triplet), tf.float32)
        return tf.math.divide_no_nan(tf.reduce_sum(per_triplet), count)
    raise MiningError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


def mine_batch_hard(embeddings: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """(T, 3) int32 triplets: each anchor with a positive, its farthest positive and closest negative."""
    dist = pairwise_sq_distances(l2_normalize(embeddings))
    pos, neg = _masks(labels)
    big = tf.reduce_max(dist) + 1.0
    hardest_pos = tf.argmax(tf.where(pos, dist, -1.0), axis=1, output_type=tf.int32)
    hardest_neg = tf.argmin(tf.where(neg, dist, big), axis=1, output_type=tf.int32)
    valid = tf.logical_and(tf.reduce_any(pos, axis=1), tf.reduce_any(neg, axis=1))
    anchors = tf.range(tf.shape(dist)[0], dtype=tf.int32)
    triplets = tf.stack([anchors, hardest_pos, hardest_neg], axis=1)
    return tf.boolean_mask(triplets, valid)


def _anchor_positive_pairs(pos: tf.Tensor, neg: tf.Tensor) -> tf.Tensor:
    """(M, 2) int32 (anchor, positive) pairs whose anchor has at least one negative."""
    has_neg = tf.reduce_any(neg, axis=1, keepdims=True)
    return tf.cast(tf.where(tf.logical_and(pos, has_neg)), tf.int32)


def mine_semi_hard(embeddings: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """(T, 3) int32 triplets: every anchor-positive pair with its semi-hard negative (see module doc)."""
    dist = pairwise_sq_distances(l2_normalize(embeddings))
    pos, neg = _masks(labels)
    pairs = _anchor_positive_pairs(pos, neg)
    d_a = tf.gather(dist, pairs[:, 0])  # (M, B) distances from each pair's anchor
    d_ap = tf.expand_dims(tf.gather_nd(dist, pairs), 1)
    neg_rows = tf.gather(neg, pairs[:, 0])
    big = tf.reduce_max(dist) + 1.0
    farther = tf.logical_and(neg_rows, d_a > d_ap)
    closest_farther = tf.argmin(tf.where(farther, d_a, big), axis=1, output_type=tf.int32)
    farthest_any = tf.argmax(tf.where(neg_rows, d_a, -1.0), axis=1, output_type=tf.int32)
    negative = tf.where(tf.reduce_any(farther, axis=1), closest_farther, farthest_any)
    return tf.concat([pairs, tf.expand_dims(negative, 1)], axis=1)


def mine_random(embeddings: tf.Tensor, labels: tf.Tensor, seed: int | None = None) -> tf.Tensor:
    """(T, 3) int32 triplets: every anchor-positive pair with a uniformly drawn negative."""
    labels = tf.reshape(labels, [-1])
    pos, neg = _masks(labels)
    pairs = _anchor_positive_pairs(pos, neg)
    neg_rows = tf.cast(tf.gather(neg, pairs[:, 0]), tf.float32)
    # Gumbel-free uniform choice: random keys, non-negatives pushed below every negative's key.
    keys = tf.random.uniform(tf.shape(neg_rows), seed=seed) + neg_rows * 2.0
    negative = tf.argmax(keys, axis=1, output_type=tf.int32)
    del embeddings  # random mining ignores the geometry by definition
    return tf.concat([pairs, tf.expand_dims(negative, 1)], axis=1)


def mine(embeddings: tf.Tensor, labels: tf.Tensor, mining: str, seed: int | None = None) -> tf.Tensor:
    """Dispatch to the named miner; raise MiningError for an unknown name."""
    if mining == "batch-hard":
        return mine_batch_hard(embeddings, labels)
    if mining == "semi-hard":
        return mine_semi_hard(embeddings, labels)
    if mining == "random":
        return mine_random(embeddings, labels, seed=seed)
    raise MiningError(f"unknown mining {mining!r}; choose one of {', '.join(MINERS)}")


def triplet_losses(embeddings: tf.Tensor, triplets: tf.Tensor, alpha: float = DEFAULT_ALPHA) -> tf.Tensor:
    """Per-triplet hinge losses (T,) for index triplets into the batch."""
    emb = l2_normalize(embeddings)
    a = tf.gather(emb, triplets[:, 0])
    p = tf.gather(emb, triplets[:, 1])
    n = tf.gather(emb, triplets[:, 2])
    return _per_triplet(a, p, n, alpha)


def mined_triplet_loss(
    embeddings: tf.Tensor, labels: tf.Tensor, mining: str = "semi-hard",
    alpha: float = DEFAULT_ALPHA, reduction: Reduction = "sum",
) -> tuple[tf.Tensor, tf.Tensor]:
    """(loss, active fraction) of the triplets the miner picks in this batch."""
    triplets = mine(embeddings, labels, mining)
    per_triplet = triplet_losses(embeddings, triplets, alpha)
    return _reduce(per_triplet, reduction), active_fraction(per_triplet)


def active_fraction(per_triplet: tf.Tensor) -> tf.Tensor:
    """Share of triplets with a non-zero loss (0 when there are none)."""
    count = tf.cast(tf.size(per_triplet), tf.float32)
    active = tf.reduce_sum(tf.cast(per_triplet > 0.0, tf.float32))
    return tf.math.divide_no_nan(active, count)


def all_triplets_active_fraction(
    embeddings: tf.Tensor, labels: tf.Tensor, alpha: float = DEFAULT_ALPHA
) -> tf.Tensor:
    """Share of ALL valid (a, p, n) triplets in the batch with a non-zero loss, independent of mining."""
    dist = pairwise_sq_distances(l2_normalize(embeddings))
    pos, neg = _masks(labels)
    # valid[a, p, n] = pos[a, p] and neg[a, n]
    valid = tf.logical_and(tf.expand_dims(pos, 2), tf.expand_dims(neg, 1))
    margin = tf.expand_dims(dist, 2) - tf.expand_dims(dist, 1) + alpha
    active = tf.logical_and(valid, margin > 0.0)
    total = tf.reduce_sum(tf.cast(valid, tf.float32))
    return tf.math.divide_no_nan(tf.reduce_sum(tf.cast(active, tf.float32)), total)
