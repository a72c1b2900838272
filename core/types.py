"""The nouns carried through the kiosk pipeline (see docs/ARCHITECTURE.md).

Every stage takes and returns these frozen, slotted dataclasses so that a stage
can be swapped without touching its neighbours. Arrays inside them are treated
as read-only by convention; nothing here is ever logged (biometric data).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]
ImageArray = npt.NDArray[np.uint8]


class DecisionKind(enum.StrEnum):
    """Outcome of an access decision, or another door event that must be on record.

    ``manual_unlock`` is an operator opening (MQTT command, Home Assistant, CLI); ``door_fault`` says the
    door actuator failed (state fault): neither comes from a face, and neither is ever a grant.
    """

    GRANTED = "granted"
    DENIED = "denied"
    UNKNOWN = "unknown"
    SPOOF = "spoof"
    MANUAL_UNLOCK = "manual_unlock"
    DOOR_FAULT = "door_fault"


# Kinds that come from a face at the door (the rest are door events without a face).
FACE_KINDS = frozenset({DecisionKind.GRANTED, DecisionKind.DENIED, DecisionKind.UNKNOWN, DecisionKind.SPOOF})


class LivenessVerdict(enum.StrEnum):
    """Verdict of one liveness check or of the fused policy."""

    LIVE = "live"
    SPOOF = "spoof"
    UNCERTAIN = "uncertain"
    SKIPPED = "skipped"


@dataclass(frozen=True, slots=True)
class Frame:
    """An RGB uint8 image (H, W, 3), a monotonic timestamp and the source id."""

    rgb: ImageArray
    timestamp: float
    source_id: str
    index: int = 0


@dataclass(frozen=True, slots=True)
class Detection:
    """A face box (x0, y0, x1, y1) in pixels, 6 BlazeFace keypoints (6, 2) in pixels, a score.

    Keypoint order (MediaPipe): right eye, left eye, nose tip, mouth centre,
    right ear tragion, left ear tragion ("right" is the subject's right).
    """

    box: tuple[float, float, float, float]
    keypoints: FloatArray
    score: float

    @property
    def width(self) -> float:
        """Box width in pixels."""
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        """Box height in pixels."""
        return self.box[3] - self.box[1]


@dataclass(frozen=True, slots=True)
class Chip:
    """An aligned face chip (RGB uint8), the 2x3 image->chip transform and a quality figure."""

    rgb: ImageArray
    transform: FloatArray
    quality: float
    detection: Detection


@dataclass(frozen=True, slots=True)
class Embedding:
    """An L2-normalised float32 vector and the sha256 of the model that produced it."""

    vector: FloatArray
    model_sha256: str


@dataclass(frozen=True, slots=True)
class Match:
    """Best gallery identity for a probe: person id, score, and margin over the runner-up identity."""

    person_id: str | None
    name: str | None
    score: float
    runner_up_score: float

    @property
    def margin(self) -> float:
        """Score of the best identity minus the runner-up identity's score."""
        return self.score - self.runner_up_score


@dataclass(frozen=True, slots=True)
class LivenessCheck:
    """One liveness check's score (higher = more live) and verdict."""

    name: str
    score: float | None
    verdict: LivenessVerdict
    detail: str = ""


@dataclass(frozen=True, slots=True)
class LivenessResult:
    """Each check's result and the fused verdict from the policy."""

    verdict: LivenessVerdict
    checks: tuple[LivenessCheck, ...] = ()

    @classmethod
    def skipped(cls) -> LivenessResult:
        """Pass-through result used when no liveness check is configured."""
        return cls(verdict=LivenessVerdict.SKIPPED, checks=())


@dataclass(frozen=True, slots=True)
class Decision:
    """An access decision with everything that led to it."""

    kind: DecisionKind
    person_id: str | None
    name: str | None
    score: float
    margin: float
    liveness: LivenessResult
    latencies_ms: dict[str, float] = field(default_factory=dict)
    model_version: str = ""
    gallery_version: str = ""
    timestamp: float = 0.0
    source_id: str = ""
    # Why a recognised person was refused (``denied``: device.decide.access.DenyReason, or "door_fault"),
    # or what failed (``door_fault``).
    reason: str = ""
    # ``manual_unlock`` only: who asked, the request's correlation id, and how long the door opened.
    requested_by: str = ""
    correlation_id: str = ""
    seconds: float | None = None
    # Opt-in JPEG of the face region for unknown/spoof events, attached by the loop only when a sink
    # asks for snapshots (core.protocol.snapshots). Biometric: excluded from repr so it never reaches logs.
    snapshot: bytes | None = field(default=None, repr=False, compare=False)
