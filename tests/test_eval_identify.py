"""`facegate eval identify`: the open-set protocol on packaged photos, its rates, and its JSON contract."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import matplotlib
import numpy as np
import pytest
from click.testing import CliRunner
from skimage import data as skimage_data

from server.evaluation.cli import cli
from server.evaluation.identify import (
    IdentifyError,
    Searches,
    fnir_at_fpir,
    is_enrolled,
    list_identities,
    rates,
    split_identities,
    tau_at_fpir,
)

data: Any = skimage_data  # scikit-image's loaders are untyped
CONTRACT = {"pipeline", "enrolled", "mated", "nonmated", "fail_to_detect", "fnir_at_fpir", "at_config"}
ENROLLED, STRANGER = "carol", "hopper"  # is_enrolled() puts them on either side of the split


def _write(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".pgm":
        assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
    else:
        assert cv2.imwrite(str(path), cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR))


@pytest.fixture(scope="module")
def identities(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Carol (the astronaut, enrolled: JPEG, PNG, PGM) and Hopper (a stranger), each with a blank image."""
    assert is_enrolled(ENROLLED) and not is_enrolled(STRANGER)
    root = tmp_path_factory.mktemp("identities")
    astro = data.astronaut()
    bgr = cv2.imread(str(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"))
    assert bgr is not None
    hopper = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    blank = np.full((250, 250, 3), 120, np.uint8)
    _write(root / ENROLLED / "1.png", astro[30:280, 100:350])  # natural order: 1, 2, 10 -> 1 enrolls
    _write(root / ENROLLED / "2.jpg", astro[20:270, 110:360][:, ::-1])
    _write(root / ENROLLED / "10.pgm", astro[25:285, 95:355])
    _write(root / ENROLLED / "11.jpg", blank)
    _write(root / STRANGER / "a.jpg", cv2.resize(hopper[90:420, 90:420], (250, 250)))
    _write(root / STRANGER / "b.jpg", cv2.resize(hopper[110:400, 110:400], (250, 250))[:, ::-1])
    _write(root / STRANGER / "c.jpg", blank)
    (root / STRANGER / "notes.txt").write_text("not an image")
    return root


def test_split_is_by_name_hash_and_natural_order(identities: Path) -> None:
    found = list_identities(identities)
    assert found[ENROLLED] == [f"{ENROLLED}/{n}" for n in ("1.png", "2.jpg", "10.pgm", "11.jpg")]
    assert len(found[STRANGER]) == 3  # notes.txt is not an image
    split = split_identities(found, 1)
    assert split.enroll == {ENROLLED: [f"{ENROLLED}/1.png"]}
    assert [p for _, p in split.mated] == found[ENROLLED][1:]
    assert [p for _, p in split.nonmated] == found[STRANGER]
    with pytest.raises(IdentifyError, match="no mated probes"):
        split_identities(found, 4)
    with pytest.raises(IdentifyError, match="needs both"):
        split_identities({ENROLLED: found[ENROLLED]}, 1)
    with pytest.raises(IdentifyError, match="no identity subfolders"):
        list_identities(identities / ENROLLED)


@pytest.mark.parametrize("pipeline", ["int8", "dlib"])
def test_identify_json_contract(identities: Path, built_models: Path, pipeline: str, tmp_path: Path) -> None:
    if pipeline == "dlib":
        pytest.importorskip("dlib", reason="dlib-bin is the reference implementation")
    plot = tmp_path / "det.png"
    result = CliRunner().invoke(cli, ["identify", "--identities", str(identities), "--pipeline", pipeline,
                                      "--models-dir", str(built_models), "--plot", str(plot), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert set(out) == CONTRACT and out["pipeline"] == pipeline
    assert set(out["fnir_at_fpir"]) == {"0.01", "0.001"}
    assert set(out["at_config"]) == {"tau", "delta", "fnir", "fpir", "wrong_id_rate"}
    assert out["enrolled"] == 1 and out["mated"] == 3 and out["nonmated"] == 3
    assert out["fail_to_detect"] >= 2  # the two blanks
    # the blank mated probe is a miss at any threshold; the blank stranger is never a false positive
    assert out["at_config"]["fnir"] >= 1 / 3 and out["fnir_at_fpir"]["0.01"] >= 1 / 3
    assert out["at_config"]["fpir"] <= 2 / 3
    assert plot.stat().st_size > 0


def test_identify_applies_a_config(identities: Path, built_models: Path, tmp_path: Path) -> None:
    config = tmp_path / "device.toml"
    config.write_text("[decision]\ntau = 0.2\ndelta = 0.0\nacknowledge_low_tau = true\n")
    result = CliRunner().invoke(cli, ["identify", "--identities", str(identities), "--pipeline", "int8",
                                      "--models-dir", str(built_models), "--config", str(config), "--json"])
    assert result.exit_code == 0, result.output
    cfg = json.loads(result.stdout)["at_config"]
    assert cfg["tau"] == 0.2 and cfg["delta"] == 0.0
    assert cfg["fpir"] == pytest.approx(2 / 3)  # a low tau lets both faces of the stranger in
    bad = CliRunner().invoke(cli, ["identify", "--identities", str(identities / ENROLLED), "--pipeline",
                                   "int8", "--models-dir", str(built_models), "--json"])
    assert bad.exit_code != 0 and "no identity subfolders" in bad.output


def _searches(mated: list[float], correct: list[bool], nonmated: list[float],
              runner_up: float = 0.0) -> Searches:
    return Searches(np.array(mated), np.full(len(mated), runner_up), np.array(correct), np.array(nonmated),
                    np.full(len(nonmated), runner_up), 2)


def test_rates_count_misses_false_positives_and_wrong_ids() -> None:
    s = _searches([0.9, 0.8, 0.95, -np.inf], [True, True, False, False], [0.7, 0.85, -np.inf, 0.5])
    r = rates(s, 0.82)
    assert r.fnir == pytest.approx(3 / 4)  # 0.8 below, the wrong id and the no-face probe
    assert r.wrong_id_rate == pytest.approx(1 / 4)
    assert r.fpir == pytest.approx(1 / 4)
    # the margin blocks a probe whose runner-up is close
    assert rates(_searches([0.9], [True], [0.85], runner_up=0.88), 0.8, 0.05).fnir == 1.0
    assert rates(_searches([0.9], [True], [0.85], runner_up=0.88), 0.8, 0.05).fpir == 0.0


def test_tau_at_fpir_is_the_lowest_threshold_meeting_the_target() -> None:
    rng = np.random.default_rng(1)
    nonmated = rng.normal(0.8, 0.05, 5000)
    for target in (1e-1, 1e-2, 1e-3):
        tau = tau_at_fpir(nonmated, target)
        assert np.mean(nonmated >= tau) <= target
        assert np.mean(nonmated >= np.nextafter(tau, -np.inf)) > target
    s = _searches(list(rng.normal(0.9, 0.05, 1000)), [True] * 1000, list(nonmated))
    assert fnir_at_fpir(s, 1e-3) >= fnir_at_fpir(s, 1e-2) >= fnir_at_fpir(s, 1e-1)
