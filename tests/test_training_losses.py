"""Triplet loss and the three miners against hand-computed tiny cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from server.training import losses  # noqa: E402
from server.training.objectives import TripletLoss, distillation_loss  # noqa: E402

ALPHA = 0.2
# Four unit vectors at these angles (degrees); identities 0, 0, 1, 1.
ANGLES = (0.0, 60.0, 90.0, 200.0)
LABELS = np.array([0, 0, 1, 1], dtype=np.int32)


def _sq(deg: float) -> float:
    """Squared distance between unit vectors ``deg`` degrees apart: 2 - 2 cos."""
    return 2.0 - 2.0 * math.cos(math.radians(deg))


def _emb(scale: float = 1.0) -> tf.Tensor:
    rows = [[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in ANGLES]
    return tf.constant(np.array(rows, dtype=np.float32) * scale)


def test_explicit_triplet_loss_sum_and_mean_on_unnormalised_input() -> None:
    a = tf.constant([[3.0, 0.0], [3.0, 0.0]])
    p = tf.constant([[0.0, 5.0], [-2.0, 0.0]])
    n = tf.constant([[-1.0, 0.0], [0.0, 0.5]])
    # Triplet 1: |A-P|^2 = 2, |A-N|^2 = 4 -> max(2 - 4 + .2, 0) = 0. Triplet 2: 4 - 2 + .2 = 2.2.
    assert float(losses.triplet_loss(a, p, n, ALPHA, "sum")) == pytest.approx(2.2, abs=1e-5)
    assert float(losses.triplet_loss(a, p, n, ALPHA, "mean")) == pytest.approx(1.1, abs=1e-5)


def test_pairwise_distances_match_hand_values() -> None:
    dist = losses.pairwise_sq_distances(losses.l2_normalize(_emb(4.0))).numpy()
    assert dist[0, 1] == pytest.approx(_sq(60), abs=1e-5)
    assert dist[1, 2] == pytest.approx(_sq(30), abs=1e-5)
    assert dist[2, 3] == pytest.approx(_sq(110), abs=1e-5)
    assert np.all(np.diag(dist) == 0.0)


def test_batch_hard_picks_farthest_positive_and_closest_negative() -> None:
    triplets = losses.mine_batch_hard(_emb(), tf.constant(LABELS)).numpy().tolist()
    # anchor 0: only positive 1; negatives 2 (d=2) and 3 (d=3.88) -> 2. anchor 1: negatives 2 (.27), 3 -> 2.
    # anchor 2: positive 3; negatives 0 (2), 1 (.27) -> 1.  anchor 3: negatives 0 (3.88), 1 (3.53) -> 1.
    assert triplets == [[0, 1, 2], [1, 0, 2], [2, 3, 1], [3, 2, 1]]
    loss, active = losses.mined_triplet_loss(_emb(), tf.constant(LABELS), "batch-hard", ALPHA)
    expected = (_sq(60) - _sq(30) + ALPHA) + (_sq(110) - _sq(30) + ALPHA)  # the other two are inactive
    assert float(loss) == pytest.approx(expected, abs=1e-5)
    assert float(active) == pytest.approx(0.5)


def test_semi_hard_picks_closest_farther_negative_else_farthest() -> None:
    triplets = losses.mine_semi_hard(_emb(), tf.constant(LABELS)).numpy().tolist()
    # (0,1): d_ap=1, both negatives farther -> closest farther 2.  (1,0): only 3 is farther than 1 -> 3.
    # (2,3): d_ap=2.68, no negative farther -> farthest negative 0.  (3,2): both farther -> closest 1.
    assert triplets == [[0, 1, 2], [1, 0, 3], [2, 3, 0], [3, 2, 1]]
    loss, active = losses.mined_triplet_loss(_emb(), tf.constant(LABELS), "semi-hard", ALPHA, "mean")
    assert float(loss) == pytest.approx((_sq(110) - _sq(90) + ALPHA) / 4, abs=1e-5)
    assert float(active) == pytest.approx(0.25)


def test_random_miner_returns_valid_triplets_and_is_forced_with_one_negative() -> None:
    labels = tf.constant([0, 0, 0, 1])
    for _ in range(5):
        triplets = losses.mine_random(_emb(), labels).numpy()
        assert triplets.shape == (6, 3)
        assert np.all(triplets[:, 2] == 3)  # the only negative of identity 0
    # identity 1 has no positive, so it never anchors
    assert 3 not in losses.mine_random(_emb(), labels).numpy()[:, 0]


def test_unknown_miner_is_a_domain_error() -> None:
    with pytest.raises(losses.MiningError, match="batch-hard"):
        losses.mine(_emb(), tf.constant(LABELS), "hardest")


def test_all_triplet_active_fraction_matches_brute_force() -> None:
    emb = _emb().numpy()
    active = total = 0
    for a in range(4):
        for p in range(4):
            for n in range(4):
                if a != p and LABELS[a] == LABELS[p] and LABELS[n] != LABELS[a]:
                    total += 1
                    d_ap = np.sum((emb[a] - emb[p]) ** 2)
                    d_an = np.sum((emb[a] - emb[n]) ** 2)
                    active += int(d_ap - d_an + ALPHA > 0)
    got = float(losses.all_triplets_active_fraction(_emb(), tf.constant(LABELS), ALPHA))
    assert total == 8
    assert got == pytest.approx(active / total)


def test_keras_loss_packs_teacher_and_adds_distillation() -> None:
    emb = _emb()
    target = tf.concat([tf.constant(LABELS, tf.float32)[:, None], emb], axis=1)
    plain = TripletLoss(mining="batch-hard", alpha=ALPHA)(target[:, :1], emb)
    distilled = TripletLoss(mining="batch-hard", alpha=ALPHA, distill="cosine")(target, emb)
    assert float(plain) == pytest.approx(float(distilled), abs=1e-5)  # student == teacher: no penalty
    # Orthogonal teacher: 1 - cos = 1 per row.
    ortho = tf.constant([[0.0, 1.0]] * 4)
    assert float(distillation_loss(tf.constant([[1.0, 0.0]] * 4), ortho, "cosine")) == pytest.approx(1.0)
    assert float(distillation_loss(tf.constant([[1.0, 0.0]] * 4), ortho, "mse")) == pytest.approx(2.0)
