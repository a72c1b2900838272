"""`facegate eval liveness-calibrate`: the BPCER-budget rule, the head fit, both protocols, the CLI."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from device.liveness.passive import head_score
from server.evaluation.liveness import LivenessEvalError
from server.evaluation.liveness_calibrate import (
    CalibrationSet,
    budget_threshold,
    calibrate,
    fit_head,
    head_matrix,
    liveness_calibrate,
    operating_point,
)


def test_budget_threshold_refuses_at_most_the_budget() -> None:
    genuine_scores = np.array([0.1, 0.5, 0.6, 0.7, 0.8, 0.9, 0.91, 0.92, 0.93, 0.95])
    g = np.ones(10, bool)
    assert budget_threshold(genuine_scores, g, 0.1) == 0.5  # one of ten refused
    assert budget_threshold(genuine_scores, g, 0.05) == 0.1  # none may be refused
    with_nan = np.append(genuine_scores, np.nan)  # a faceless genuine frame spends the budget first
    assert budget_threshold(with_nan, np.ones(11, bool), 0.1) == 0.1
    assert budget_threshold(np.array([np.nan, 0.9]), np.array([True, True]), 0.0) == 0.0


def test_operating_point_keeps_every_set_within_budget() -> None:
    a = (np.array([0.2, 0.6, 0.7, 0.8, 0.05]), np.array([True, True, True, True, False]))
    b = (np.array([0.4, 0.9, 0.95, 0.97, 0.3]), np.array([True, True, True, True, False]))
    threshold, band = operating_point([a, b], budget=0.25, band_budget=0.0)
    assert threshold == 0.6  # set a allows 0.6, set b 0.9: the lower keeps both within 25%
    assert band == pytest.approx(math.log(0.6 / 0.4) - math.log(0.2 / 0.8))


def _synthetic(name: str, rng: np.random.Generator, shift: float) -> CalibrationSet:
    """Genuine frames: large genuine-minus-attack margins; attacks: small; a per-set offset in one class."""
    n = 80
    genuine = np.arange(n) < n // 2
    logits = rng.normal(0.0, 1.0, (n, 2, 3)).astype(np.float32)
    logits[genuine, :, 1] += 3.0
    logits[:, :, 0] += shift
    return CalibrationSet(name, logits, genuine, [f"{name}{i % 8}" for i in range(n)],
                          ["genuine" if g else ("print" if i % 2 else "screen")
                           for i, g in enumerate(genuine)])


def test_head_and_protocols_on_synthetic_sets() -> None:
    rng = np.random.default_rng(0)
    sets = [_synthetic("a", rng, 0.0), _synthetic("b", rng, 1.0)]
    head = fit_head([head_matrix(c.logits) for c in sets], [c.genuine for c in sets])
    assert len(head) == 5
    scores = np.array([head_score(row, head) for row in sets[0].logits])
    assert scores[sets[0].genuine].mean() > 0.8 > 0.2 > scores[~sets[0].genuine].mean()
    result = calibrate(sets, budget=0.05, band_budget=0.01, folds=4)
    for protocol in ("leave-one-dataset-out", "leave-subjects-out"):
        for scorer in ("head", "mean-softmax"):
            held = result["protocols"][protocol][scorer]["b"]
            assert set(held["apcer_by_kind"]) == {"print", "screen"}
            assert 0.0 <= held["apcer"] <= 1.0 and held["n_genuine"] == 40
    assert len(result["protocols"]["leave-subjects-out"]["head"]["fold_thresholds"]) == 4
    final = result["final"]
    assert len(final["passive_head"]) == 5 and 0.0 < final["passive_threshold"] < 1.0
    for name in ("a", "b"):
        assert final["in_sample"][name]["bpcer"] <= 0.05  # the budget holds on every calibration set
    with pytest.raises(LivenessEvalError, match="genuine and attack"):
        fit_head([head_matrix(sets[0].logits)[:10]], [sets[0].genuine[:10]])


def test_cli_on_two_real_subsets(shared_dir: Path, tmp_path: Path) -> None:
    """NUAA and Replay-Attack subsets: JSON with both protocols and the final numbers; the cache is reused."""
    nuaa = shared_dir / "data" / "liveness-nuaa"
    with open(nuaa / "labels.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    folder = tmp_path / "nuaa-subset"
    folder.mkdir()
    with open(folder / "labels.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "subject", "session"])
        for subject in ("0001", "0004", "0007"):
            for label in ("genuine", "attack"):
                for r in [r for r in rows if r["subject"] == subject and r["label"] == label][:2]:
                    writer.writerow([os.path.relpath(nuaa / r["path"], folder), label, subject, r["session"]])
    from tests.test_liveness_eval import _replay_subset

    replay = _replay_subset(shared_dir, tmp_path)
    cache = tmp_path / "cache"
    args = ["--labels", str(folder / "labels.csv"), "--labels", str(replay), "--minifasnet",
            str(shared_dir / "models" / "minifasnet"), "--folds", "3", "--cache", str(cache), "--json",
            "--no-progress"]
    first = CliRunner().invoke(liveness_calibrate, args)
    assert first.exit_code == 0, first.output
    payload = json.loads(first.stdout)
    assert payload["sets"] == ["nuaa-subset", "replay-subset"]
    assert set(payload["protocols"]["leave-one-dataset-out"]["head"]) == {"nuaa-subset", "replay-subset"}
    assert payload["protocols"]["leave-subjects-out"]["head"]["replay-subset"]["apcer_by_kind"].keys() == {
        "print", "screen"}
    assert len(payload["final"]["passive_head"]) == 5
    assert len(list(cache.iterdir())) == 2
    again = CliRunner().invoke(liveness_calibrate, args)
    assert json.loads(again.stdout) == payload  # from the cache, the same numbers
