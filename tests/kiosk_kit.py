"""Hand-driven inputs of the kiosk screen's model: a clock, an agent status, a challenge reporter, faces."""

from __future__ import annotations

import numpy as np

from core.types import Chip, Decision, DecisionKind, Detection, Frame, ImageArray, LivenessResult
from device.agent.status import AgentStatus
from device.liveness.challenge import ChallengeStatus
from device.pipeline.frame import FaceView


class Clock:
    """A hand-driven monotonic clock."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        """The current time."""
        return self.now


class Status:
    """An agent's status as the screen reads it (the real AgentStatus dataclass)."""

    def __init__(self) -> None:
        self.door = "locked"
        self.camera = True
        self.warnings: dict[str, str] = {}

    def status(self) -> AgentStatus:
        """The snapshot."""
        return AgentStatus(device_id="door-1", running=True, uptime_s=1.0, fps=10.0, capture_fps=10.0,
                           frames_captured=1, frames_processed=1, queue_drops=0, bad_frames=0,
                           camera_errors=0, camera_connected=self.camera, processing_errors=0, faces=0,
                           decisions={},
                           last_decision=None, model_version="m", model_sha256="s", gallery_version="g",
                           gallery_persons=1, door_state=self.door, liveness="passive",
                           warnings=dict(self.warnings))


class Reporter:
    """A liveness engine's ``challenges()`` (ChallengeReporter)."""

    def __init__(self) -> None:
        self.pending: tuple[ChallengeStatus, ...] = ()

    def challenges(self) -> tuple[ChallengeStatus, ...]:
        """The pending challenges."""
        return self.pending


def decision(kind: DecisionKind, name: str | None = None, reason: str = "") -> Decision:
    """A decision of ``kind`` naming ``name`` (as the engine names recognised persons)."""
    return Decision(kind=kind, person_id="p-1" if name else None, name=name, score=0.9, margin=0.2,
                    liveness=LivenessResult.skipped(), reason=reason)


def face_frame(box: tuple[float, float, float, float] = (100, 80, 220, 220), brightness: int = 150,
               sharp: bool = True, ts: float = 100.0, track: int = 1,
               rgb: ImageArray | None = None) -> tuple[Frame, list[FaceView]]:
    """A frame (flat grey unless ``rgb``) with one face: its box, a sharp or flat chip, its track."""
    rng = np.random.default_rng(0)
    rgb = np.full((320, 320, 3), brightness, np.uint8) if rgb is None else rgb
    chip = (rng.integers(0, 255, (150, 150, 3)) if sharp else np.full((150, 150, 3), 128)).astype(np.uint8)
    det = Detection(box=box, keypoints=np.zeros((6, 2), np.float32), score=0.9)
    chip_of = Chip(chip, np.eye(2, 3, dtype=np.float32), 1.0, det)
    view = FaceView(track, det, chip_of, LivenessResult.skipped())
    return Frame(rgb, ts, "test"), [view]
