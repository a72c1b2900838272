"""`facegate eval liveness`: threshold choice, leave-subjects-out CV, no-face frames, the JSON contract."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from server.evaluation.liveness import (
    LivenessEvalError,
    apcer_by_kind,
    choose_threshold,
    cross_validate,
    error_rates,
    liveness,
    load_kinds,
    load_labels,
    subject_folds,
)

CONTRACT_KEYS = {"apcer", "bpcer", "acer", "n_genuine", "n_attack", "threshold", "apcer_by_kind",
                 "threshold_source"}


def _replay_subset(shared_dir: Path, tmp_path: Path, per_kind: int = 2) -> Path:
    """A few Replay-Attack frames per kind (with kinds.csv) from 3 clients, in a folder of their own."""
    source = shared_dir / "data" / "replay-attack"
    with open(source / "labels.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    with open(source / "kinds.csv", newline="", encoding="utf-8") as handle:
        kind_of = {r["path"]: r["kind"] for r in csv.DictReader(handle)}
    picked = []
    for subject in sorted({r["subject"] for r in rows})[:3]:
        for kind in ("genuine", "print", "screen"):
            picked += [r for r in rows if r["subject"] == subject and kind_of[r["path"]] == kind][:per_kind]
    folder = tmp_path / "replay-subset"
    folder.mkdir()
    with open(folder / "labels.csv", "w", newline="", encoding="utf-8") as labels, \
            open(folder / "kinds.csv", "w", newline="", encoding="utf-8") as kinds:
        lw, kw = csv.writer(labels), csv.writer(kinds)
        lw.writerow(["path", "label", "subject", "session"])
        kw.writerow(["path", "kind"])
        for r in picked:
            rel = os.path.relpath(source / r["path"], folder)
            lw.writerow([rel, r["label"], r["subject"], r["session"]])
            kw.writerow([rel, kind_of[r["path"]]])
    return folder / "labels.csv"


def test_fixed_threshold_kinds_and_det_plot(shared_dir: Path, tmp_path: Path) -> None:
    """--threshold decides every frame at T (no fitting); kinds.csv gives APCER per kind; --det a PNG."""
    labels = _replay_subset(shared_dir, tmp_path)
    det = tmp_path / "det.png"
    common = ["--labels", str(labels), "--minifasnet", str(shared_dir / "models" / "minifasnet"), "--json",
              "--no-progress"]
    result = CliRunner().invoke(liveness, [*common, "--threshold", "1.0", "--det", str(det)])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert set(payload) == CONTRACT_KEYS
    assert payload["threshold_source"] == "fixed" and payload["threshold"] == 1.0
    assert payload["apcer_by_kind"] == {"print": 0.0, "screen": 0.0}  # nothing scores above 1
    assert payload["bpcer"] == 1.0 and payload["n_genuine"] == 6 and payload["n_attack"] == 12
    assert det.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    everything = json.loads(CliRunner().invoke(liveness, [*common, "--threshold", "0.0"]).stdout)
    assert everything["apcer_by_kind"] == {"print": 1.0, "screen": 1.0} and everything["bpcer"] == 0.0


def test_kinds_file_must_cover_every_attack(tmp_path: Path) -> None:
    labels = "path,label,subject\na.jpg,genuine,1\nb.jpg,attack,1\n"
    (tmp_path / "labels.csv").write_text(labels, encoding="utf-8")
    (tmp_path / "kinds.csv").write_text("path,kind\na.jpg,genuine\n", encoding="utf-8")
    rows = load_labels(tmp_path / "labels.csv")
    with pytest.raises(LivenessEvalError, match=r"no attack kind for the attack frame b\.jpg"):
        load_kinds(tmp_path / "labels.csv", rows)
    (tmp_path / "kinds.csv").write_text("path,kind\nb.jpg,screen\n", encoding="utf-8")
    kinds = load_kinds(tmp_path / "labels.csv", rows)
    assert kinds == ["genuine", "screen"]
    assert apcer_by_kind([True, True], kinds) == {"screen": 1.0}


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_threshold_is_the_logit_middle_of_the_optimal_gap() -> None:
    scores = [0.6, 0.9, 0.95, 0.01, 0.1, 0.05]
    genuine = [True, True, True, False, False, False]
    t = choose_threshold(scores, genuine)
    assert _logit(t) == pytest.approx((_logit(0.1) + _logit(0.6)) / 2)
    rates = error_rates(scores, genuine, t)
    assert rates.apcer == 0 and rates.bpcer == 0 and rates.acer == 0


def test_threshold_minimises_acer_with_overlap() -> None:
    # one attack (0.7) above one genuine (0.65): the best ACER is 1/6 at either side of the overlap
    scores = [0.65, 0.9, 0.95, 0.7, 0.1, 0.05]
    genuine = [True, True, True, False, False, False]
    t = choose_threshold(scores, genuine)
    assert error_rates(scores, genuine, t).acer == pytest.approx(1 / 6)


def test_no_face_frames_are_never_accepted() -> None:
    scores = [np.nan, 0.9, np.nan, 0.01]
    genuine = [True, True, False, False]
    rates = error_rates(scores, genuine, 0.5)
    assert rates.bpcer == 0.5  # the genuine frame without a face is a bona fide rejection
    assert rates.apcer == 0.0  # the attack frame without a face did not get through
    assert 0.01 < choose_threshold(scores, genuine) <= 0.9


def test_cross_validation_holds_subjects_out() -> None:
    folds = subject_folds(["b", "a", "c", "a"], 0)
    assert folds == {"a": 0, "b": 1, "c": 0}  # at least 2 folds, round-robin over sorted subjects
    assert subject_folds(["a", "b", "c"], 10) == {"a": 0, "b": 1, "c": 2}
    # subject "c" has genuine scores far below the others': held out, its frames are rejected
    scores = [0.9, 0.8, 0.01, 0.02, 0.95, 0.85, 0.03, 0.01, 0.1, 0.12, 0.001, 0.002]
    genuine = [True, True, False, False] * 3
    subjects = ["a"] * 4 + ["b"] * 4 + ["c"] * 4
    rates, thresholds, accepted = cross_validate(scores, genuine, subjects, folds=3)
    assert len(thresholds) == 3
    assert accepted[8:10].tolist() == [False, False]  # subject c's genuine frames, held out
    assert rates.bpcer == pytest.approx(2 / 6) and rates.apcer == 0.0
    with pytest.raises(LivenessEvalError, match="at least 2 subjects"):
        cross_validate(scores, genuine, ["a"] * 12, folds=3)


def test_bad_labels_are_domain_errors(tmp_path: Path) -> None:
    bad = tmp_path / "labels.csv"
    bad.write_text("path,label,subject\nx.jpg,real,1\n", encoding="utf-8")
    with pytest.raises(LivenessEvalError, match="label must be one of"):
        load_labels(bad)
    bad.write_text("path,label\nx.jpg,genuine\n", encoding="utf-8")
    with pytest.raises(LivenessEvalError, match="lacks column"):
        load_labels(bad)
    bad.write_text("path,label,subject\nx.jpg,genuine,1\n", encoding="utf-8")
    with pytest.raises(LivenessEvalError, match="both genuine and attack"):
        load_labels(bad)


def test_cli_prints_exactly_the_contract(shared_dir: Path, tmp_path: Path) -> None:
    """A 3-subject subset of NUAA plus one faceless frame: exactly one JSON object on stdout."""
    nuaa = shared_dir / "data" / "liveness-nuaa"
    with open(nuaa / "labels.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    subset = []
    for subject in ("0002", "0006", "0009"):
        for label in ("genuine", "attack"):
            subset += [r for r in rows if r["subject"] == subject and r["label"] == label][:3]
    blank = tmp_path / "blank.png"
    import cv2

    cv2.imwrite(str(blank), np.full((240, 320, 3), 128, np.uint8))
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "subject", "session"])
        for r in subset:
            rel = os.path.relpath(nuaa / r["path"], tmp_path)
            writer.writerow([rel, r["label"], r["subject"], r["session"]])
        writer.writerow(["blank.png", "genuine", "0009", "01"])
    args = ["--labels", str(labels), "--minifasnet", str(shared_dir / "models" / "minifasnet"), "--json",
            "--no-progress"]
    result = CliRunner().invoke(liveness, args)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert set(payload) == CONTRACT_KEYS
    assert payload["n_genuine"] == 10 and payload["n_attack"] == 9
    assert payload["apcer"] == 0.0
    assert payload["bpcer"] == pytest.approx(1 / 10)  # only the faceless genuine frame is rejected
    assert payload["acer"] == pytest.approx((payload["apcer"] + payload["bpcer"]) / 2)
    assert 0.0 < payload["threshold"] < 1.0
    assert payload["threshold_source"] == "leave-subjects-out" and payload["apcer_by_kind"] is None
    assert "no face found in 1 genuine" in result.stderr


def test_cli_reports_missing_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FACEGATE_MINIFASNET_DIR", raising=False)
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label,subject\na.jpg,genuine,1\nb.jpg,attack,2\n", encoding="utf-8")
    result = CliRunner().invoke(liveness, ["--labels", str(labels), "--minifasnet", str(tmp_path), "--json"])
    assert result.exit_code != 0
    assert "Silent-Face-Anti-Spoofing" in result.output
