"""The in-process status snapshot of the agent (published by the MQTT issue) and its counters."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from core.protocol.schemas import decision_record
from core.types import Decision

# Frame rates are measured over this sliding window.
FPS_WINDOW_S = 5.0
# Keys of the unsafe settings a door may run with (only when configured explicitly); metrics label by them.
LIVENESS_OFF_KEY, LOW_TAU_KEY = "liveness_off", "low_tau"
UNSAFE_SETTINGS = (LIVENESS_OFF_KEY, LOW_TAU_KEY)


class RateMeter:
    """Events per second over a sliding window; thread-safe."""

    def __init__(self, window_s: float = FPS_WINDOW_S) -> None:
        self.window_s = window_s
        self._times: deque[float] = deque()
        self._lock = threading.Lock()

    def tick(self, now: float | None = None) -> None:
        """Count one event."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._times.append(now)
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self._times and now - self._times[0] > self.window_s:
            self._times.popleft()

    def rate(self, now: float | None = None) -> float:
        """Events per second in the window."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._trim(now)
            if len(self._times) < 2:
                return 0.0
            span = max(now - self._times[0], 1e-6)
            return len(self._times) / span


@dataclass(slots=True)
class Counters:
    """Monotonic counters updated by the loop threads (ints: atomic enough under the GIL)."""

    frames_captured: int = 0
    frames_processed: int = 0
    queue_drops: int = 0
    camera_errors: int = 0
    processing_errors: int = 0
    sink_errors: int = 0
    door_errors: int = 0
    faces: int = 0
    decisions: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AgentStatus:
    """A consistent-enough snapshot of the running agent."""

    device_id: str
    running: bool
    uptime_s: float
    fps: float
    capture_fps: float
    frames_captured: int
    frames_processed: int
    queue_drops: int
    bad_frames: int
    camera_errors: int
    camera_connected: bool
    processing_errors: int
    faces: int
    decisions: dict[str, int]
    last_decision: Decision | None
    model_version: str
    model_sha256: str
    gallery_version: str
    gallery_persons: int
    door_state: str
    error: str | None = None
    liveness: str = ""
    # Unsafe settings in force, by key ("liveness_off", "low_tau") with their text; empty when none.
    warnings: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-safe dict (the last decision without any biometric data)."""
        return {
            "device_id": self.device_id,
            "running": self.running,
            "uptime_s": round(self.uptime_s, 1),
            "fps": round(self.fps, 2),
            "capture_fps": round(self.capture_fps, 2),
            "frames_captured": self.frames_captured,
            "frames_processed": self.frames_processed,
            "queue_drops": self.queue_drops,
            "bad_frames": self.bad_frames,
            "camera_errors": self.camera_errors,
            "camera_connected": self.camera_connected,
            "processing_errors": self.processing_errors,
            "faces": self.faces,
            "decisions": dict(self.decisions),
            "last_decision": decision_record(self.last_decision) if self.last_decision else None,
            "model_version": self.model_version,
            "model_sha256": self.model_sha256,
            "gallery_version": self.gallery_version,
            "gallery_persons": self.gallery_persons,
            "door_state": self.door_state,
            "error": self.error,
            "liveness": self.liveness,
            "warnings": list(self.warnings.values()),
        }
