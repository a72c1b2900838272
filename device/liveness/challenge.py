"""Active challenge: ask for a random action (blink, turn left, turn right) and verify it within a time limit.

States: ``issued`` -> ``passed`` | ``failed`` (reason ``timeout`` or ``wrong_action``). A final state never
changes. The machine consumes per-frame ``FaceMeasures`` (eye aspect ratio, yaw) from the face mesh.

- **Blink**: the open-eye level is the median EAR of the frames seen while the eyes were open; the eyes
  count as closed below ``closed_ratio`` x that level and as open again above ``open_ratio`` x it. A blink
  is open -> closed -> open, and needs ``min_baseline_frames`` open frames first (no baseline, no blink).
- **Turns** are from the *subject's* point of view: ``turn_left`` means the person turns their head to
  their own left, which is positive yaw (see ``models.face.mesh``; on an unmirrored camera the nose moves to
  the image right). A turn counts only after the head was seen facing the camera (``|yaw| < neutral_deg``),
  so a head that is already turned when the challenge appears does not pass by itself; it passes when
  yaw goes beyond ``turn_deg`` in the asked direction.
- **Wrong action**: a turn beyond ``turn_deg`` in a direction that was not asked (also during a blink
  challenge) fails the challenge. Blinks are never wrong: people blink unprompted every few seconds.
- **Timeout**: a frame at or after the deadline fails an unfinished challenge, even if it completes the
  action (the limit is strict).
"""

from __future__ import annotations

import enum
import random
import secrets
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

from models.face.mesh import FaceMeasures


class ChallengeAction(enum.StrEnum):
    """What the person is asked to do (turn directions are the subject's own left/right)."""

    BLINK = "blink"
    TURN_LEFT = "turn_left"
    TURN_RIGHT = "turn_right"


class ChallengeState(enum.StrEnum):
    """Where a challenge is: waiting for the action, or finished."""

    ISSUED = "issued"
    PASSED = "passed"
    FAILED = "failed"


class FailReason(enum.StrEnum):
    """Why a challenge failed."""

    TIMEOUT = "timeout"
    WRONG_ACTION = "wrong_action"


@dataclass(frozen=True, slots=True)
class ChallengeParams:
    """Thresholds of the challenge; defaults match ``LivenessConfig``."""

    timeout_s: float = 5.0
    # A mesh EAR of an open eye is ~0.28 (0.24-0.37 on CelebA); lids that close bring it well under
    # 60 % of the person's own open level, half-closed eyes (squinting) stay above it.
    closed_ratio: float = 0.6
    # Re-opening needs 85 % of the open level: hysteresis so that jitter around the closed level
    # cannot count as several blinks or as a blink at all.
    open_ratio: float = 0.85
    # Open-eye frames needed before a closure can count (a median of fewer frames is noise).
    min_baseline_frames: int = 3
    # Yaw beyond which a turn counts; mesh yaw is ~0.6x the 2-D nose-offset angle, 20 deg is a clear turn.
    turn_deg: float = 20.0
    # Yaw below which the head counts as facing the camera (must be seen before a turn counts).
    neutral_deg: float = 8.0

    def __post_init__(self) -> None:
        if not 0 < self.closed_ratio < self.open_ratio <= 1:
            raise ValueError("need 0 < closed_ratio < open_ratio <= 1")
        if not 0 <= self.neutral_deg < self.turn_deg:
            raise ValueError("need 0 <= neutral_deg < turn_deg")
        if self.timeout_s <= 0 or self.min_baseline_frames < 1:
            raise ValueError("timeout_s must be > 0 and min_baseline_frames >= 1")


@dataclass(frozen=True, slots=True)
class ChallengeStatus:
    """What a kiosk screen shows and an event carries: the action, the deadline and the state."""

    track_id: int
    action: ChallengeAction
    state: ChallengeState
    issued_at: float
    deadline: float
    reason: str = ""

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-ready form for device status and events."""
        return {
            "track_id": self.track_id,
            "action": self.action.value,
            "state": self.state.value,
            "issued_at": round(self.issued_at, 3),
            "deadline": round(self.deadline, 3),
            "reason": self.reason,
        }

    def detail(self) -> str:
        """Compact ``key=value`` text for ``LivenessCheck.detail``."""
        text = f"action={self.action.value} state={self.state.value} deadline={self.deadline:.3f}"
        return f"{text} reason={self.reason}" if self.reason else text


ChallengeListener = Callable[[ChallengeStatus], None]


@runtime_checkable
class ChallengeReporter(Protocol):
    """A liveness engine that can say which challenges are on screen (``isinstance`` works at run time)."""

    def challenges(self) -> tuple[ChallengeStatus, ...]:
        """Status of every live track's challenge."""
        ...


def pick_action(actions: Sequence[ChallengeAction], rng: random.Random | None = None) -> ChallengeAction:
    """A random action; the default RNG is the OS's, so an attacker cannot predict the sequence."""
    if not actions:
        raise ValueError("no challenge actions configured")
    chooser = rng if rng is not None else secrets.SystemRandom()
    return chooser.choice(list(actions))


class Challenge:
    """One challenge for one track: feed it every frame's measures with ``update``."""

    def __init__(self, action: ChallengeAction, issued_at: float, params: ChallengeParams | None = None,
                 track_id: int = 0) -> None:
        self.params = params if params is not None else ChallengeParams()
        self._status = ChallengeStatus(track_id, action, ChallengeState.ISSUED, issued_at,
                                       issued_at + self.params.timeout_s)
        self._open_ears: list[float] = []
        self._eyes_closed = False
        self._neutral_seen = False

    @property
    def status(self) -> ChallengeStatus:
        """The current status (immutable snapshot)."""
        return self._status

    @property
    def done(self) -> bool:
        """True once passed or failed."""
        return self._status.state is not ChallengeState.ISSUED

    def _finish(self, state: ChallengeState, reason: str = "") -> ChallengeStatus:
        self._status = replace(self._status, state=state, reason=reason)
        return self._status

    def update(self, measures: FaceMeasures | None, timestamp: float) -> ChallengeStatus:
        """Advance with one frame (``None`` when no landmarks were found) and return the status."""
        if self.done:
            return self._status
        if timestamp >= self._status.deadline:
            return self._finish(ChallengeState.FAILED, FailReason.TIMEOUT.value)
        if measures is None:
            return self._status
        turned = self._turn(measures.yaw_deg)
        if turned is not None:
            if turned is self._status.action:
                return self._finish(ChallengeState.PASSED)
            return self._finish(ChallengeState.FAILED, f"{FailReason.WRONG_ACTION.value}:{turned.value}")
        if self._blinked(measures.ear) and self._status.action is ChallengeAction.BLINK:
            return self._finish(ChallengeState.PASSED)
        return self._status

    def _turn(self, yaw_deg: float) -> ChallengeAction | None:
        """The turn completed on this frame, if any (only after a frontal frame was seen)."""
        if abs(yaw_deg) < self.params.neutral_deg:
            self._neutral_seen = True
            return None
        if not self._neutral_seen or abs(yaw_deg) < self.params.turn_deg:
            return None
        return ChallengeAction.TURN_LEFT if yaw_deg > 0 else ChallengeAction.TURN_RIGHT

    def _blinked(self, ear: float) -> bool:
        """True on the frame where the eyes re-open after a closure."""
        if len(self._open_ears) < self.params.min_baseline_frames:
            if not self._eyes_closed:
                self._open_ears.append(ear)
            return False
        level = statistics.median(self._open_ears)
        if self._eyes_closed:
            if ear > self.params.open_ratio * level:
                self._eyes_closed = False
                self._open_ears.append(ear)
                return True
            return False
        if ear < self.params.closed_ratio * level:
            self._eyes_closed = True
            return False
        self._open_ears.append(ear)
        return False
