"""Verification metrics on pair scores: ROC, AUC, EER, TAR at a FAR, and the threshold for a FAR.

Conventions: a pair is *accepted* when its score is strictly above the threshold; ``labels`` are 1 for a
genuine (same person) pair and 0 for an impostor pair. Scores may be ``-inf`` (a face was not found):
such a pair is never accepted. numpy only, so training and calibration can reuse it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

# FAR operating points reported by `facegate eval verify` (keys are the JSON keys).
REPORT_FARS: tuple[str, ...] = ("0.01", "0.001")


class MetricsError(ValueError):
    """Scores and labels cannot be evaluated (empty, mismatched, one class missing, NaN)."""


def _split(scores: npt.ArrayLike, labels: npt.ArrayLike) -> tuple[npt.NDArray[np.float64],
                                                                 npt.NDArray[np.float64]]:
    """(genuine scores, impostor scores) after checking the inputs."""
    s = np.asarray(scores, np.float64).ravel()
    y = np.asarray(labels).ravel()
    if s.shape != y.shape:
        raise MetricsError(f"{s.size} scores but {y.size} labels")
    if np.isnan(s).any():
        raise MetricsError("scores contain NaN (use -inf for a failed pair)")
    if not np.isin(y, (0, 1)).all():
        raise MetricsError("labels must be 0 (impostor) or 1 (genuine)")
    pos, neg = s[y == 1], s[y == 0]
    if pos.size == 0 or neg.size == 0:
        raise MetricsError(f"need both genuine and impostor pairs (got {pos.size} and {neg.size})")
    return pos, neg


def roc_curve(scores: npt.ArrayLike, labels: npt.ArrayLike,
              ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """(far, tar, thresholds): one point per distinct score, accepting scores >= threshold.

    Starts at (0, 0) with threshold +inf and ends at (1, 1).
    """
    pos, neg = _split(scores, labels)
    thresholds = np.unique(np.concatenate([pos, neg]))[::-1]
    pos_sorted, neg_sorted = np.sort(pos), np.sort(neg)
    # count of scores >= t = n - (number strictly below t)
    tar = (pos.size - np.searchsorted(pos_sorted, thresholds, side="left")) / pos.size
    far = (neg.size - np.searchsorted(neg_sorted, thresholds, side="left")) / neg.size
    return (np.concatenate([[0.0], far]), np.concatenate([[0.0], tar]),
            np.concatenate([[np.inf], thresholds]))


def roc_auc(scores: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """Area under the ROC: P(genuine score > impostor score) + 0.5 P(tie) (Mann-Whitney, exact)."""
    pos, neg = _split(scores, labels)
    neg_sorted = np.sort(neg)
    below = np.searchsorted(neg_sorted, pos, side="left")
    ties = np.searchsorted(neg_sorted, pos, side="right") - below
    return float((below.sum() + 0.5 * ties.sum()) / (pos.size * neg.size))


def equal_error_rate(scores: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """The rate where FAR equals FRR, interpolated linearly between adjacent ROC points."""
    far, tar, _ = roc_curve(scores, labels)
    frr = 1.0 - tar
    diff = far - frr  # rises from -1 (nothing accepted) to +1 (everything accepted)
    j = int(np.argmax(diff >= 0))
    if j == 0 or diff[j] == 0:
        return float(far[j])
    i = j - 1
    t = diff[i] / (diff[i] - diff[j])
    return float(far[i] + t * (far[j] - far[i]))


def threshold_at_far(scores: npt.ArrayLike, labels: npt.ArrayLike, far: float) -> float:
    """The lowest threshold whose FAR (accepting scores > threshold) does not exceed ``far``."""
    if not 0.0 <= far <= 1.0:
        raise MetricsError(f"far must be in [0, 1], got {far}")
    _, neg = _split(scores, labels)
    allowed = int(np.floor(far * neg.size + 1e-9))  # impostor pairs that may be accepted
    if allowed >= neg.size:
        return float("-inf")
    return float(np.sort(neg)[::-1][allowed])


def tar_at_far(scores: npt.ArrayLike, labels: npt.ArrayLike, far: float) -> float:
    """Genuine accept rate at the threshold from ``threshold_at_far``."""
    pos, _ = _split(scores, labels)
    threshold = threshold_at_far(scores, labels, far)
    return float(np.mean(pos > threshold))


@dataclass(frozen=True, slots=True)
class VerificationReport:
    """The figures `facegate eval verify` prints."""

    pairs: int
    auc: float
    eer: float
    tar_at_far: dict[str, float]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict (keys as in the CLI contract)."""
        return {"pairs": self.pairs, "auc": self.auc, "eer": self.eer, "tar_at_far": dict(self.tar_at_far)}


def verification_report(scores: npt.ArrayLike, labels: npt.ArrayLike,
                         fars: tuple[str, ...] = REPORT_FARS) -> VerificationReport:
    """AUC, EER and TAR at each FAR in ``fars`` (given as the strings used for JSON keys)."""
    s = np.asarray(scores, np.float64).ravel()
    return VerificationReport(
        pairs=int(s.size),
        auc=roc_auc(s, labels),
        eer=equal_error_rate(s, labels),
        tar_at_far={key: tar_at_far(s, labels, float(key)) for key in fars},
    )


def best_accuracy_threshold(scores: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """The threshold (accept ``score > t``) with the highest accuracy; midway between adjacent scores."""
    pos, neg = _split(scores, labels)
    values = np.unique(np.concatenate([pos, neg]))
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return float("inf")
    # candidates: below every score, between adjacent scores, above every score
    cands = np.concatenate([[finite[0] - 1.0], (finite[:-1] + finite[1:]) / 2.0, [finite[-1] + 1.0]])
    pos_sorted, neg_sorted = np.sort(pos), np.sort(neg)
    accepted_pos = pos.size - np.searchsorted(pos_sorted, cands, side="right")
    rejected_neg = np.searchsorted(neg_sorted, cands, side="right")
    accuracy = (accepted_pos + rejected_neg) / (pos.size + neg.size)
    return float(cands[int(np.argmax(accuracy))])


def _mean_sd(values: list[float]) -> dict[str, float | None]:
    """Mean and sd over the folds where the figure exists (null in JSON when none has it)."""
    finite = [v for v in values if np.isfinite(v)]
    if not finite:
        return {"mean": None, "sd": None}
    return {"mean": float(np.mean(finite)), "sd": float(np.std(finite))}


def tenfold_report(scores: npt.ArrayLike, labels: npt.ArrayLike, folds: npt.ArrayLike,
                   fars: tuple[str, ...] = REPORT_FARS) -> dict[str, Any] | None:
    """The standard protocol: each fold's figures at thresholds chosen on the *other* folds, mean and sd.

    Accuracy uses the best-accuracy threshold of the other folds; for each FAR the threshold of
    ``threshold_at_far`` on the other folds gives the held-out fold's TAR and FAR. None with < 2 folds.
    """
    s = np.asarray(scores, np.float64).ravel()
    y = np.asarray(labels).ravel()
    f = np.asarray(folds).ravel()
    names = sorted(set(f.tolist()))
    if len(names) < 2:
        return None
    accuracy, thresholds = [], []
    at_far: dict[str, dict[str, list[float]]] = {key: {"tar": [], "far": []} for key in fars}
    for fold in names:
        test, train = f == fold, f != fold
        t = best_accuracy_threshold(s[train], y[train])
        thresholds.append(t)
        accuracy.append(float(np.mean((s[test] > t) == (y[test] == 1))))
        for key in fars:
            tf = threshold_at_far(s[train], y[train], float(key))
            pos, neg = s[test][y[test] == 1], s[test][y[test] == 0]
            at_far[key]["tar"].append(float(np.mean(pos > tf)) if pos.size else float("nan"))
            at_far[key]["far"].append(float(np.mean(neg > tf)) if neg.size else float("nan"))
    return {
        "folds": len(names),
        "accuracy": _mean_sd(accuracy),
        "threshold": _mean_sd(thresholds),
        "tar_at_far": {key: {"tar": _mean_sd(v["tar"]), "far": _mean_sd(v["far"])}
                       for key, v in at_far.items()},
    }
