"""The door screen's model: what the person at the door is told, built from the agent's own interfaces.

Three feeds, all public interfaces of the agent:

- ``emit`` (an ``EventSink``): every decision; a result (granted, denied, not recognised, spoof, opened by
  the operator) stays on screen for ``[kiosk] result_hold_s``;
- ``observe`` (a frame observer, on the processing thread): the faces of each processed frame, from which
  the quality hints come (too far: narrower than ``[quality] min_face_px``; too dark: the face's mean
  brightness under ``[kiosk] dark_level``; hold still: a chip below ``[quality] min_sharpness`` or a face
  that jumped), and the liveness engine's pending challenge (``ChallengeReporter.challenges()``), read
  on the thread that owns it;
- ``agent.status()`` and the broker connection, read when the screen asks: door state, camera, liveness
  off, online.

What the screen shows, first match wins: out of service (camera lost or loop stopped); a challenge issued
after the latest result; a result younger than ``result_hold_s``; a quality hint; "one moment" while a
face is being checked; "look at the camera".

Privacy: only a ``granted`` result carries a name, only the first name, and only with ``show_names``.
Unknown, spoof and denied results never name anyone (a spoof of an enrolled person's photo carries the
person's name in the decision; the screen drops it). No chip, embedding or template is kept here.
"""

from __future__ import annotations

import datetime as dt
import enum
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from core.types import Decision, DecisionKind, Frame
from device.agent.status import LIVENESS_OFF_KEY, AgentStatus
from device.config import QualityConfig
from device.decide.access import DenyReason
from device.decide.tracks import Box
from device.kiosk.config import KioskConfig
from device.liveness.challenge import ChallengeAction, ChallengeReporter, ChallengeState, ChallengeStatus
from device.pipeline.frame import FaceView
from device.vision.quality import sharpness

# A face whose centre moves more than this share of its width between two processed frames is moving:
# "hold still" (a walking person moves ~0.5 face widths per frame at 10 fps; camera jitter stays < 0.1).
MOTION_FRACTION = 0.35
# A hint stays up this long after the last frame that called for it, so it does not flicker per frame.
HINT_HOLD_S = 1.0
# Faces seen longer ago than this are gone (the loop also stops calling when the camera stalls).
FACE_STALE_S = 1.5


class Screen(enum.StrEnum):
    """What the screen shows (the ``state`` of ``GET /kiosk/state``)."""

    IDLE = "idle"
    HINT = "hint"
    CHECKING = "checking"
    CHALLENGE = "challenge"
    GRANTED = "granted"
    DENIED = "denied"
    UNKNOWN = "unknown"
    SPOOF = "spoof"
    OPENED = "opened"
    UNAVAILABLE = "unavailable"


class Hint(enum.StrEnum):
    """Quality hints, most useful first."""

    TOO_FAR = "too_far"
    TOO_DARK = "too_dark"
    HOLD_STILL = "hold_still"


# Results: the decision kinds that put a banner on screen.
RESULTS = {
    DecisionKind.GRANTED: Screen.GRANTED,
    DecisionKind.DENIED: Screen.DENIED,
    DecisionKind.UNKNOWN: Screen.UNKNOWN,
    DecisionKind.SPOOF: Screen.SPOOF,
    DecisionKind.MANUAL_UNLOCK: Screen.OPENED,
}
MESSAGES = {
    Screen.IDLE: "Look at the camera",
    Screen.CHECKING: "One moment…",
    Screen.DENIED: "Access denied",
    Screen.UNKNOWN: "Not recognised",
    Screen.SPOOF: "Not accepted: show your real face",
    Screen.OPENED: "Door opened by the operator",
    Screen.UNAVAILABLE: "Out of service: the door stays locked",
}
HINTS = {
    Hint.TOO_FAR: "Too far: come closer",
    Hint.TOO_DARK: "Too dark: face the light",
    Hint.HOLD_STILL: "Hold still",
}
PROMPTS = {
    ChallengeAction.BLINK: "Blink your eyes",
    ChallengeAction.TURN_LEFT: "Turn your head to your left",
    ChallengeAction.TURN_RIGHT: "Turn your head to your right",
}
DENY_TEXT = {
    DenyReason.BLOCKED.value: "Access denied: not allowed at this door",
    DenyReason.OUTSIDE_SCHEDULE.value: "Access denied: outside your access hours",
    "door_fault": "Access denied: the door could not open",
}
# Box colours of the preview by screen (the page repeats each in words: colour is never alone).
TONES = {
    Screen.GRANTED: "ok", Screen.OPENED: "ok",
    Screen.DENIED: "bad", Screen.UNKNOWN: "bad", Screen.SPOOF: "bad", Screen.UNAVAILABLE: "bad",
    Screen.CHALLENGE: "warn", Screen.HINT: "warn",
}


@dataclass(frozen=True, slots=True)
class KioskState:
    """The screen's model; ``as_dict`` is the JSON of ``GET /kiosk/state``."""

    state: Screen
    message: str
    person_name: str | None
    challenge: dict[str, Any] | None
    door: str
    online: bool | None  # None: a standalone door (no broker configured)
    liveness: str  # "on" | "off"
    ts: str

    def as_dict(self) -> dict[str, Any]:
        """Exactly the fields other displays follow."""
        return {"state": self.state.value, "message": self.message, "person_name": self.person_name,
                "challenge": self.challenge, "door": self.door, "online": self.online,
                "liveness": self.liveness, "ts": self.ts}


class StatusReader(Protocol):
    """What the screen reads from the agent (``device.agent.loop.Agent``)."""

    def status(self) -> AgentStatus:
        """The agent's snapshot."""
        ...


@dataclass(frozen=True, slots=True)
class _Result:
    screen: Screen
    message: str
    person_name: str | None
    at: float  # monotonic


@dataclass(frozen=True, slots=True)
class _Challenge:
    status: ChallengeStatus
    remaining_at_seen: float  # seconds left at the frame that reported it
    seen: float  # monotonic time of that report
    first_seen: float  # monotonic time the screen first saw this challenge


def first_name(name: str | None) -> str | None:
    """The first word of a name, or None."""
    words = (name or "").split()
    return words[0] if words else None


def result_of(decision: Decision, show_names: bool) -> tuple[Screen, str, str | None] | None:
    """(screen, message, name) of a decision's banner, or None when it puts none up (a door fault)."""
    screen = RESULTS.get(decision.kind)
    if screen is None:
        return None
    if screen is Screen.GRANTED:
        name = first_name(decision.name) if show_names else None
        return screen, f"Welcome, {name}" if name else "Welcome", name
    if screen is Screen.DENIED:
        return screen, DENY_TEXT.get(decision.reason, MESSAGES[Screen.DENIED]), None
    return screen, MESSAGES[screen], None  # unknown, spoof, opened: never a name


def face_hint(frame: Frame, view: FaceView, previous: Box | None, quality: QualityConfig,
              dark_level: float) -> Hint | None:
    """The most useful quality hint for one face, or None when it looks fine."""
    det = view.detection
    if det.width < quality.min_face_px:
        return Hint.TOO_FAR
    height, width = frame.rgb.shape[:2]
    x0, y0, x1, y1 = (round(v) for v in det.box)
    region = frame.rgb[max(y0, 0):min(y1, height), max(x0, 0):min(x1, width)]
    if region.size and float(np.mean(region)) < dark_level:
        return Hint.TOO_DARK
    if previous is not None:
        moved = np.hypot((x0 + x1 - previous[0] - previous[2]) / 2, (y0 + y1 - previous[1] - previous[3]) / 2)
        if moved > MOTION_FRACTION * det.width:
            return Hint.HOLD_STILL
    if sharpness(view.chip.rgb) < quality.min_sharpness:
        return Hint.HOLD_STILL
    return None


class KioskScreen:
    """The screen's model; an ``EventSink`` and a frame observer of the agent. Thread-safe."""

    def __init__(self, config: KioskConfig, quality: QualityConfig, agent: StatusReader,
                 challenges: ChallengeReporter | None = None, online: Callable[[], bool] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.quality = quality
        self.agent = agent
        self.challenges = challenges
        self.online = online
        self.clock = clock
        self._lock = threading.Lock()
        self._result: _Result | None = None
        self._challenge: _Challenge | None = None
        self._hint: tuple[Hint, float] | None = None
        self._faces_at: float | None = None  # monotonic time of the latest frame with a face
        self._tracks: tuple[int, ...] = ()
        self._last_box: Box | None = None

    # ------------------------------------------------------------------ feeds (processing thread)
    def emit(self, decision: Decision) -> None:
        """Put the decision's banner up (EventSink)."""
        shown = result_of(decision, self.config.show_names)
        if shown is None:
            return
        with self._lock:
            self._result = _Result(*shown, at=self.clock())

    def close(self) -> None:
        """Nothing to release (EventSink)."""

    def observe(self, frame: Frame, views: Sequence[FaceView]) -> None:
        """Take the hints and the pending challenge from one processed frame (frame observer)."""
        now = self.clock()
        pending = None
        if self.challenges is not None and views:
            tracks = {v.track_id for v in views}
            issued = [c for c in self.challenges.challenges()
                      if c.state is ChallengeState.ISSUED and c.track_id in tracks]
            pending = issued[-1] if issued else None
        hint = None
        box = None
        if views:
            face = max(views, key=lambda v: v.detection.width * v.detection.height)
            box = face.detection.box
            hint = face_hint(frame, face, self._last_box, self.quality, self.config.dark_level)
        with self._lock:
            self._last_box = box
            self._tracks = tuple(v.track_id for v in views)
            if views:
                self._faces_at = now
            if hint is not None:
                self._hint = (hint, now)
            if pending is None:
                self._challenge = None
            else:
                old = self._challenge
                same = old is not None and (old.status.track_id, old.status.issued_at) == (
                    pending.track_id, pending.issued_at)
                first = old.first_seen if same and old is not None else now
                self._challenge = _Challenge(pending, pending.deadline - frame.timestamp, now, first)

    # ------------------------------------------------------------------ the model (any thread)
    def state(self) -> KioskState:
        """What the screen shows now."""
        status = self.agent.status()
        now = self.clock()
        online = None
        if self.online is not None:
            try:
                online = bool(self.online())
            except Exception:  # a broken client reads as offline, never as a crash of the screen
                online = False
        with self._lock:
            result, challenge, hint, faces_at = self._result, self._challenge, self._hint, self._faces_at
        screen, message, name, prompt = self._pick(status, now, result, challenge, hint, faces_at)
        return KioskState(
            state=screen, message=message, person_name=name, challenge=prompt, door=status.door_state,
            online=online, liveness="off" if LIVENESS_OFF_KEY in status.warnings else "on",
            ts=dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
        )

    def _pick(self, status: AgentStatus, now: float, result: _Result | None, challenge: _Challenge | None,
              hint: tuple[Hint, float] | None, faces_at: float | None,
              ) -> tuple[Screen, str, str | None, dict[str, Any] | None]:
        if not status.running or not status.camera_connected:
            return Screen.UNAVAILABLE, MESSAGES[Screen.UNAVAILABLE], None, None
        fresh = result is not None and now - result.at < self.config.result_hold_s
        faces = faces_at is not None and now - faces_at < FACE_STALE_S
        if challenge is not None and faces:
            remaining = challenge.remaining_at_seen - (now - challenge.seen)
            newer = result is None or not fresh or challenge.first_seen > result.at
            if remaining > 0 and newer:
                c = challenge.status
                prompt = {"action": c.action.value, "prompt": PROMPTS[c.action],
                          "remaining_s": round(remaining, 1), "timeout_s": round(c.deadline - c.issued_at, 1)}
                return Screen.CHALLENGE, PROMPTS[c.action], None, prompt
        if fresh and result is not None:
            return result.screen, result.message, result.person_name, None
        if not faces:
            return Screen.IDLE, MESSAGES[Screen.IDLE], None, None
        if hint is not None and now - hint[1] < HINT_HOLD_S:
            return Screen.HINT, HINTS[hint[0]], None, None
        return Screen.CHECKING, MESSAGES[Screen.CHECKING], None, None

    def tone(self) -> str:
        """The preview's box colour for what the screen shows now ("ok", "bad", "warn", "neutral")."""
        try:
            return TONES.get(self.state().state, "neutral")
        except Exception:  # the preview must keep running whatever the status does
            return "neutral"
