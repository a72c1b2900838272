"""`facegate eval calibrate`: tau for a target FAR from impostor scores; TAR on calibration folds."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from server.evaluation.calibrate import calibrate, choose_tau, rates_at


def test_tau_bounds_the_impostor_accept_rate_with_device_semantics() -> None:
    rng = np.random.default_rng(3)
    impostor = rng.normal(0.5, 0.1, 10_000)
    genuine = rng.normal(0.9, 0.05, 2_000)
    scores = np.concatenate([genuine, impostor, [-np.inf]])
    labels = np.concatenate([np.ones(2_000, int), np.zeros(10_000, int), [1]])
    for far in (1e-1, 1e-2, 1e-3):
        tau = choose_tau(scores, labels, far)
        rates = rates_at(scores, labels, tau)
        assert rates.far <= far  # the device accepts score >= tau
        # tau is the lowest such threshold: one impostor more would pass just below it
        assert np.sum(impostor >= np.nextafter(tau, -np.inf)) > far * impostor.size
        assert rates.genuine == 2_001 and rates.impostor == 10_000
    assert choose_tau(scores, labels, 1.0) == -1.0


def test_cli_prints_exactly_far_tau_tar(tmp_path: Path, shared_dir: Path, built_models: Path) -> None:
    root = shared_dir / "data" / "celeba-faces"
    with open(root / "pairs.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    def pick(fold: str, same: str, count: int) -> list[dict[str, str]]:
        return [r for r in rows if r["fold"] == fold and r["same"] == same][:count]

    chosen = pick("1", "1", 12) + pick("1", "0", 12) + pick("9", "1", 6) + pick("9", "0", 6)
    for row in chosen:
        for key in ("path_a", "path_b"):
            target = tmp_path / row[key]
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / row[key], target)
    pairs = tmp_path / "pairs.csv"
    with open(pairs, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["fold", "path_a", "path_b", "same"])
        writer.writeheader()
        writer.writerows(chosen)
    result = CliRunner().invoke(calibrate, ["--pairs", str(pairs), "--far", "0.1", "--folds", "1",
                                            "--models-dir", str(built_models), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert list(out) == ["far", "tau", "tar"] and out["far"] == 0.1
    assert -1.0 <= out["tau"] <= 1.0 and 0.0 <= out["tar"] <= 1.0
    bad = CliRunner().invoke(calibrate, ["--pairs", str(pairs), "--folds", "7", "--models-dir",
                                         str(built_models), "--json"])
    assert bad.exit_code != 0 and "no pairs" in bad.output
