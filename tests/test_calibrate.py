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


def _fake_identities(count: int, photos: int, seed: int = 0,
                     prefix: str = "p") -> tuple[dict[str, list[str]], dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    identities: dict[str, list[str]] = {}
    vectors: dict[str, np.ndarray] = {}
    for i in range(count):
        centre = rng.standard_normal(128)
        identities[f"{prefix}{i}"] = [f"{prefix}{i}/{j}.jpg" for j in range(photos)]
        for path in identities[f"{prefix}{i}"]:
            v = centre + 0.6 * rng.standard_normal(128)
            vectors[path] = (v / np.linalg.norm(v)).astype(np.float32)
    return identities, vectors


def test_open_set_rows_meet_the_target_where_chosen_and_grow_with_the_gallery() -> None:
    from server.evaluation.openset import DELTA_GRID, calibrate_sizes

    identities, vectors = _fake_identities(60, 6)
    held_ids, held_vecs = _fake_identities(60, 6, seed=1, prefix="q")
    rows = calibrate_sizes({"tune": (vectors, identities), "report": (held_vecs, held_ids)}, [10, 300],
                           fpir=1e-2, draws=3)
    assert [r.gallery_size for r in rows] == [10, 300]
    for row in rows:
        assert row.fpir <= 1e-2 and row.delta in DELTA_GRID and 0.0 <= row.fnir <= 1.0
        assert set(row.heldout) == {"fnir", "fpir", "wrong_id_rate"}
        directions = [(f["chosen_on"], f["measured_on"]) for f in row.folds]
        assert directions == [("report", "tune"), ("tune", "report")]
    # more persons enrolled, more chances for a stranger: tau does not go down
    assert rows[1].tau >= rows[0].tau - 0.02


def test_margin_is_dropped_when_it_does_not_pay() -> None:
    from server.evaluation.identify import Searches
    from server.evaluation.openset import choose_rule

    rng = np.random.default_rng(2)
    # the runner-up tells nothing: strangers and genuine probes have the same margins
    mated = rng.normal(0.9, 0.03, 3000)
    nonmated = rng.normal(0.75, 0.05, 3000)
    s = Searches(mated, mated - rng.uniform(0, 0.2, 3000), np.ones(3000, bool), nonmated,
                 nonmated - rng.uniform(0, 0.2, 3000), 50)
    tau, delta = choose_rule(s, 1e-3)
    assert delta == 0.0 and np.mean(nonmated >= tau) <= 1e-3
    # strangers always have a close runner-up, enrolled people never: the margin pays
    s = Searches(mated, mated - 0.2, np.ones(3000, bool), nonmated + 0.1, nonmated + 0.1 - 0.01, 50)
    assert choose_rule(s, 1e-3)[1] > 0.0


def test_open_set_cli_needs_identities_and_enough_of_them(tmp_path: Path, shared_dir: Path,
                                                          built_models: Path) -> None:
    no_root = CliRunner().invoke(calibrate, ["--open-set", "--json"])
    assert no_root.exit_code != 0 and "--identities" in no_root.output
    no_mode = CliRunner().invoke(calibrate, ["--json"])
    assert no_mode.exit_code != 0 and "--pairs" in no_mode.output
    root = shared_dir / "data" / "celeba-faces"
    for folder in sorted(p for p in root.iterdir() if p.is_dir())[:4]:
        for image in sorted(folder.glob("*.jpg"))[:3]:
            target = tmp_path / folder.name / image.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(image, target)
    few = CliRunner().invoke(calibrate, ["--open-set", "--identities", str(tmp_path), "--models-dir",
                                         str(built_models), "--json"])
    assert few.exit_code != 0 and "needs at least" in few.output
    for folder in sorted(p for p in root.iterdir() if p.is_dir())[4:20]:
        for image in sorted(folder.glob("*.jpg"))[:3]:
            target = tmp_path / folder.name / image.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(image, target)
    ok = CliRunner().invoke(calibrate, ["--open-set", "--identities", str(tmp_path), "--models-dir",
                                        str(built_models), "--fpir", "0.1", "--gallery-size", "3",
                                        "--gallery-size", "30", "--draws", "2", "--json"])
    assert ok.exit_code == 0, ok.output
    out = json.loads(ok.stdout)
    assert out["fpir"] == 0.1 and [r["gallery_size"] for r in out["rows"]] == [3, 30]
    assert all(r["fpir"] <= 0.1 and -1.0 <= r["tau"] <= 1.0 for r in out["rows"])
