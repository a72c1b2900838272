"""Verification metrics against cases computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from server.evaluation.metrics import (
    MetricsError,
    best_accuracy_threshold,
    equal_error_rate,
    roc_auc,
    roc_curve,
    tar_at_far,
    tenfold_report,
    threshold_at_far,
    verification_report,
)

# genuine 0.9 0.8 0.4 / impostor 0.7 0.3 0.2 0.1
SCORES = np.array([0.9, 0.8, 0.4, 0.7, 0.3, 0.2, 0.1])
LABELS = np.array([1, 1, 1, 0, 0, 0, 0])


def test_auc_counts_ordered_pairs() -> None:
    # 0.9 and 0.8 beat all 4 impostors, 0.4 beats 3 of them: 11 of 12 pairs
    assert roc_auc(SCORES, LABELS) == pytest.approx(11 / 12)


def test_auc_counts_ties_as_half() -> None:
    assert roc_auc([0.5, 0.5, 0.1], [1, 0, 0]) == pytest.approx(0.75)


def test_roc_curve_points() -> None:
    far, tar, thresholds = roc_curve(SCORES, LABELS)
    assert thresholds[0] == np.inf and far[0] == 0 and tar[0] == 0
    assert far[-1] == 1 and tar[-1] == 1
    # at threshold 0.7 (accept >= 0.7): 1 of 4 impostors, 2 of 3 genuine
    k = int(np.where(thresholds == 0.7)[0][0])
    assert far[k] == pytest.approx(0.25) and tar[k] == pytest.approx(2 / 3)
    assert np.all(np.diff(far) >= 0) and np.all(np.diff(tar) >= 0)


def test_eer_interpolates_where_far_meets_frr() -> None:
    # between thresholds 0.7 and 0.4 FAR stays 1/4 while FRR falls from 1/3 to 0: they meet at 1/4
    assert equal_error_rate(SCORES, LABELS) == pytest.approx(0.25)


def test_perfect_separation() -> None:
    scores, labels = [0.9, 0.8, 0.2, 0.1], [1, 1, 0, 0]
    assert roc_auc(scores, labels) == 1.0
    assert equal_error_rate(scores, labels) == 0.0
    assert tar_at_far(scores, labels, 0.0) == 1.0


def test_threshold_and_tar_at_far() -> None:
    # FAR 0: threshold is the top impostor (0.7), genuine above it: 0.9, 0.8
    assert threshold_at_far(SCORES, LABELS, 0.0) == pytest.approx(0.7)
    assert tar_at_far(SCORES, LABELS, 0.0) == pytest.approx(2 / 3)
    # FAR 1/4: one impostor may pass, threshold is the second (0.3): all genuine pass
    assert threshold_at_far(SCORES, LABELS, 0.25) == pytest.approx(0.3)
    assert tar_at_far(SCORES, LABELS, 0.25) == pytest.approx(1.0)
    # FAR 0.2 < 1/4: still no impostor may pass
    assert tar_at_far(SCORES, LABELS, 0.2) == pytest.approx(2 / 3)
    assert threshold_at_far(SCORES, LABELS, 1.0) == -np.inf


def test_failed_pairs_are_never_accepted() -> None:
    scores = np.array([-np.inf, 0.9, 0.1, -np.inf])
    labels = np.array([1, 1, 0, 0])
    # 0.9 beats both impostors, -inf beats none and ties one: (2 + 0.5) / 4
    assert roc_auc(scores, labels) == pytest.approx(0.625)
    assert tar_at_far(scores, labels, 0.5) == pytest.approx(0.5)
    assert tar_at_far(scores, labels, 1.0) == pytest.approx(0.5)


def test_report_keys() -> None:
    report = verification_report(SCORES, LABELS).as_dict()
    assert set(report) == {"pairs", "auc", "eer", "tar_at_far"}
    assert report["pairs"] == 7 and set(report["tar_at_far"]) == {"0.01", "0.001"}
    assert report["tar_at_far"]["0.01"] == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    ("scores", "labels", "match"),
    [
        ([0.1, np.nan], [1, 0], "NaN"),
        ([0.1, 0.2], [1, 1], "both"),
        ([0.1, 0.2, 0.3], [1, 0], "labels"),
        ([0.1, 0.2], [1, 2], "0 .impostor"),
    ],
)
def test_bad_input(scores: list[float], labels: list[int], match: str) -> None:
    with pytest.raises(MetricsError, match=match):
        roc_auc(scores, labels)


def test_far_out_of_range() -> None:
    with pytest.raises(MetricsError, match="far"):
        threshold_at_far(SCORES, LABELS, 1.5)


def test_best_accuracy_threshold_separates_when_it_can() -> None:
    t = best_accuracy_threshold([0.9, 0.8, 0.3, 0.2, -np.inf], [1, 1, 0, 0, 1])
    assert 0.3 < t < 0.8


def test_tenfold_chooses_each_threshold_on_the_other_folds() -> None:
    rng = np.random.default_rng(0)
    folds = np.repeat(np.arange(1, 11), 200)
    labels = np.tile(np.repeat([1, 0], 100), 10)
    scores = np.where(labels == 1, rng.normal(0.9, 0.05, 2000), rng.normal(0.6, 0.05, 2000))
    scores[(folds == 3) & (labels == 0)] += 0.5  # one fold's impostors look genuine
    report = tenfold_report(scores, labels, folds)
    assert report is not None and report["folds"] == 10
    # fold 3 cannot be tuned for: its impostors pass the others' threshold, so accuracy varies
    assert report["accuracy"]["mean"] == pytest.approx(0.95, abs=0.01)
    assert report["accuracy"]["sd"] > 0.1
    assert report["tar_at_far"]["0.001"]["far"]["mean"] > 0.05
    assert tenfold_report(scores[folds == 1], labels[folds == 1], folds[folds == 1]) is None
