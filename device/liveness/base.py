"""The liveness engine interface the frame loop calls, and the pass-through used when none is configured."""

from __future__ import annotations

from typing import Protocol

from device.types import Detection, ImageArray, LivenessResult


class LivenessEngine(Protocol):
    """Assesses one face in one frame, with the track it belongs to for multi-frame checks."""

    def assess(
        self, rgb: ImageArray, detection: Detection, track_id: int, timestamp: float
    ) -> LivenessResult:
        """Return each check's score and verdict plus the fused verdict."""
        ...

    def end_track(self, track_id: int) -> None:
        """Forget the per-track state of a track that ended."""
        ...


class PassThroughLiveness:
    """No liveness checks: every face is reported as ``skipped``."""

    def assess(
        self, rgb: ImageArray, detection: Detection, track_id: int, timestamp: float
    ) -> LivenessResult:
        """Return the skipped result."""
        return LivenessResult.skipped()

    def end_track(self, track_id: int) -> None:
        """Nothing to forget."""
