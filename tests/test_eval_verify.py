"""`facegate eval verify` on a small pairs file made from packaged photos (and on CelebA when present)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import cv2
import matplotlib
import numpy as np
import pytest
from click.testing import CliRunner
from skimage import data as skimage_data

from server.evaluation.cli import cli
from server.evaluation.verify import PairsError, pair_scores, read_pairs, run_verify

data: Any = skimage_data  # scikit-image's loaders are untyped
CONTRACT_KEYS = {"pipeline", "pairs", "auc", "eer", "tar_at_far", "fail_to_detect", "tenfold"}


def _write(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


@pytest.fixture(scope="module")
def pairs_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two people (astronaut, Grace Hopper), re-framed and mirrored, plus an image with no face."""
    root = tmp_path_factory.mktemp("pairs")
    astro = data.astronaut()
    bgr = cv2.imread(str(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"))
    assert bgr is not None
    hopper = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    crops = {
        "a/1.jpg": astro[30:280, 100:350],
        "a/2.jpg": np.ascontiguousarray(astro[20:270, 110:360][:, ::-1]),
        "h/1.jpg": cv2.resize(hopper[90:420, 90:420], (250, 250)),
        "h/2.jpg": np.ascontiguousarray(cv2.resize(hopper[110:400, 110:400], (250, 250))[:, ::-1]),
        "x/blank.jpg": np.full((250, 250, 3), 120, np.uint8),
    }
    for rel, rgb in crops.items():
        _write(root / rel, np.ascontiguousarray(rgb))
    rows = [
        (1, "a/1.jpg", "a/2.jpg", 1),
        (1, "h/1.jpg", "h/2.jpg", 1),
        (1, "a/1.jpg", "h/1.jpg", 0),
        (1, "a/2.jpg", "h/2.jpg", 0),
        (2, "x/blank.jpg", "a/1.jpg", 1),
        (2, "x/blank.jpg", "h/1.jpg", 0),
    ]
    path = root / "pairs.csv"
    path.write_text("fold,path_a,path_b,same\n" + "".join(f"{f},{a},{b},{s}\n" for f, a, b, s in rows))
    return path


@pytest.mark.parametrize("pipeline", ["int8", "float", "dlib"])
def test_verify_contract(pairs_csv: Path, built_models: Path, pipeline: str) -> None:
    result = run_verify(pairs_csv, pipeline, built_models, progress=False)
    assert set(result) == CONTRACT_KEYS
    assert result["pipeline"] == pipeline and result["pairs"] == 6
    assert set(result["tar_at_far"]) == {"0.01", "0.001"}
    # the blank image fails: counted, and its genuine pair is a failure (not skipped)
    assert result["fail_to_detect"] == 1
    assert 0.0 <= result["auc"] <= 1.0 and 0.0 <= result["eer"] <= 1.0
    # 2 of 3 genuine pairs found (the third has no face): at most 2/3 accepted at any FAR
    assert result["tar_at_far"]["0.01"] <= 2 / 3 + 1e-9
    # two folds: each scored at the threshold chosen on the other
    ten = result["tenfold"]
    assert ten["folds"] == 2 and 0.0 <= ten["accuracy"]["mean"] <= 1.0 and ten["accuracy"]["sd"] >= 0.0
    assert set(ten["tar_at_far"]) == {"0.01", "0.001"}


def test_failed_pairs_score_minus_inf(pairs_csv: Path) -> None:
    pairs = read_pairs(pairs_csv)
    vec = (np.ones(4) / 2).astype(np.float32)
    scores = pair_scores(pairs, {"a/1.jpg": vec, "a/2.jpg": vec, "x/blank.jpg": None})
    assert scores[0] == pytest.approx(1.0)
    assert np.isneginf(scores[4]) and np.isneginf(scores[1])


def test_cli_prints_exactly_one_json_object(pairs_csv: Path, built_models: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "from facegate.cli import main; main()", "eval", "verify", "--pairs",
         str(pairs_csv), "--pipeline", "int8", "--models-dir", str(built_models), "--json"],
        capture_output=True, text=True, timeout=600, check=True,
    )
    result = json.loads(proc.stdout)  # the whole stdout is one JSON document
    assert set(result) == CONTRACT_KEYS and proc.stdout.strip().count("\n") == 0


def test_cli_folds_and_errors(pairs_csv: Path, built_models: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(cli, ["verify", "--pairs", str(pairs_csv), "--pipeline", "int8", "--models-dir",
                             str(built_models), "--folds", "1", "--json", "--no-progress"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["pairs"] == 4
    bad = runner.invoke(cli, ["verify", "--pairs", str(pairs_csv), "--pipeline", "int8", "--folds", "x"])
    assert bad.exit_code != 0 and "folds" in bad.output
    missing = runner.invoke(cli, ["verify", "--pairs", str(pairs_csv), "--pipeline", "int8", "--models-dir",
                                  str(pairs_csv.parent / "nowhere"), "--json"])
    assert missing.exit_code != 0 and "manifest" in missing.output


def test_malformed_pairs_file(tmp_path: Path) -> None:
    bad = tmp_path / "pairs.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(PairsError, match="columns"):
        read_pairs(bad)
    with pytest.raises(PairsError, match="does not exist"):
        read_pairs(tmp_path / "nope.csv")


def test_celeba_fold_smoke(shared_dir: Path, built_models: Path, tmp_path: Path) -> None:
    """The first 40 pairs of the real protocol's fold 1 through our int8 pipeline."""
    source = shared_dir / "data" / "celeba-faces" / "pairs.csv"
    fold = read_pairs(source, frozenset({1}))
    rows = [r for r in fold if r.same][:20] + [r for r in fold if not r.same][:20]
    subset = tmp_path / "pairs.csv"  # absolute image paths: joined to the CSV folder they stay as they are
    subset.write_text("fold,path_a,path_b,same\n" + "".join(
        f"{r.fold},{source.parent / r.path_a},{source.parent / r.path_b},{r.same}\n" for r in rows))
    result = run_verify(subset, "int8", built_models, progress=False)
    assert result["pairs"] == 40 and result["fail_to_detect"] == 0 and result["auc"] > 0.9
