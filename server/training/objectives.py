"""Keras wrappers of the triplet loss, the distillation term and the active-triplet metrics.

They plug into the ordinary ``model.compile(loss=..., metrics=[...])`` workflow. The target
``y_true`` of a batch packs the identity label in column 0 and, for distillation, the teacher's
precomputed embedding in the remaining columns: shape (B, 1) or (B, 1 + D).
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import keras
import tensorflow as tf

from server.training.losses import (
    DEFAULT_ALPHA,
    MINERS,
    MiningError,
    Reduction,
    active_fraction,
    all_triplets_active_fraction,
    l2_normalize,
    mine,
    triplet_losses,
)

Distill = Literal["none", "cosine", "mse"]
DISTILL_KINDS: tuple[str, ...] = get_args(Distill)
PACKAGE = "facegate"


def split_target(y_true: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(labels (B,), teacher embeddings (B, D) or (B, 0)) from a packed target."""
    y_true = tf.convert_to_tensor(y_true)
    if y_true.shape.rank == 1:
        y_true = tf.expand_dims(y_true, 1)
    labels = tf.cast(tf.round(y_true[:, 0]), tf.int32)
    return labels, tf.cast(y_true[:, 1:], tf.float32)


def distillation_loss(student: tf.Tensor, teacher: tf.Tensor, kind: str) -> tf.Tensor:
    """Mean over the batch of (1 - cosine) or the squared error between unit-length embeddings."""
    s, t = l2_normalize(student), l2_normalize(teacher)
    if kind == "cosine":
        return tf.reduce_mean(1.0 - tf.reduce_sum(s * t, axis=-1))
    if kind == "mse":
        return tf.reduce_mean(tf.reduce_sum(tf.square(s - t), axis=-1))
    raise MiningError(f"unknown distillation {kind!r}; choose one of {', '.join(DISTILL_KINDS)}")


@keras.saving.register_keras_serializable(package=PACKAGE)
class TripletLoss(keras.losses.Loss):  # type: ignore[misc]  # keras is untyped
    """Mined triplet loss, optionally plus ``distill_weight`` x distillation from teacher embeddings."""

    def __init__(
        self, mining: str = "semi-hard", alpha: float = DEFAULT_ALPHA, reduce: Reduction = "sum",
        distill: str = "none", distill_weight: float = 1.0, name: str = "triplet_loss", **kwargs: Any,
    ) -> None:
        kwargs.pop("reduction", None)
        super().__init__(name=name, reduction="sum", **kwargs)
        if mining not in MINERS:
            raise MiningError(f"unknown mining {mining!r}; choose one of {', '.join(MINERS)}")
        if distill not in DISTILL_KINDS:
            raise MiningError(f"unknown distillation {distill!r}; choose one of {', '.join(DISTILL_KINDS)}")
        self.mining, self.alpha, self.reduce = mining, float(alpha), reduce
        self.distill, self.distill_weight = distill, float(distill_weight)

    def call(self, y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        """Scalar loss of the batch."""
        labels, teacher = split_target(y_true)
        per_triplet = triplet_losses(y_pred, mine(y_pred, labels, self.mining), self.alpha)
        total = tf.reduce_sum(per_triplet)
        if self.reduce == "mean":
            total = tf.math.divide_no_nan(total, tf.cast(tf.size(per_triplet), tf.float32))
        # Batches without teacher columns (e.g. held-out validation) get the triplet term only.
        if self.distill != "none" and teacher.shape[-1]:
            total = total + self.distill_weight * distillation_loss(y_pred, teacher, self.distill)
        return total

    def get_config(self) -> dict[str, Any]:
        """Constructor arguments for save/load."""
        return {"name": self.name, "mining": self.mining, "alpha": self.alpha, "reduce": self.reduce,
                "distill": self.distill, "distill_weight": self.distill_weight}


@keras.saving.register_keras_serializable(package=PACKAGE)
class ActiveTriplets(keras.metrics.Mean):  # type: ignore[misc]  # keras is untyped
    """Share of the mined triplets with a non-zero loss, averaged over the batches of an epoch."""

    def __init__(self, mining: str = "semi-hard", alpha: float = DEFAULT_ALPHA,
                 name: str = "active_fraction", **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        self.mining, self.alpha = mining, float(alpha)

    def update_state(self, y_true: tf.Tensor, y_pred: tf.Tensor, sample_weight: Any = None) -> None:
        """Add this batch's active fraction."""
        labels, _ = split_target(y_true)
        per_triplet = triplet_losses(y_pred, mine(y_pred, labels, self.mining), self.alpha)
        super().update_state(active_fraction(per_triplet))

    def get_config(self) -> dict[str, Any]:
        """Constructor arguments for save/load."""
        return {"name": self.name, "mining": self.mining, "alpha": self.alpha}


@keras.saving.register_keras_serializable(package=PACKAGE)
class AllActiveTriplets(keras.metrics.Mean):  # type: ignore[misc]  # keras is untyped
    """Share of ALL valid triplets of the batch with a non-zero loss (what random sampling would see)."""

    def __init__(self, alpha: float = DEFAULT_ALPHA, name: str = "active_all_fraction",
                 **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        self.alpha = float(alpha)

    def update_state(self, y_true: tf.Tensor, y_pred: tf.Tensor, sample_weight: Any = None) -> None:
        """Add this batch's all-triplet active fraction."""
        labels, _ = split_target(y_true)
        super().update_state(all_triplets_active_fraction(y_pred, labels, self.alpha))

    def get_config(self) -> dict[str, Any]:
        """Constructor arguments for save/load."""
        return {"name": self.name, "alpha": self.alpha}
