"""The liveness engine interface the frame loop calls, and the pass-through used when none is configured."""

from __future__ import annotations

from typing import Protocol

from core.types import Detection, ImageArray, LivenessResult
from device.config import LivenessConfig
from models.face.mesh import MeshResult

# What status, metrics, doctor and Home Assistant show for a door that runs no liveness check.
LIVENESS_OFF = "liveness off"


class LivenessEngine(Protocol):
    """Assesses one face in one frame, with the track it belongs to for multi-frame checks."""

    def assess(
        self, rgb: ImageArray, detection: Detection, track_id: int, timestamp: float,
        mesh: MeshResult | None = None,
    ) -> LivenessResult:
        """Return each check's score and verdict plus the fused verdict (``mesh``: landmarks already run)."""
        ...

    def end_track(self, track_id: int) -> None:
        """Forget the per-track state of a track that ended."""
        ...


def describe_liveness(config: LivenessConfig) -> str:
    """A short, human-readable summary of the checks a liveness config runs ("liveness off" when none)."""
    parts = []
    if config.passive.enabled:
        parts.append("passive")
    if config.challenge.mode != "never":
        parts.append("challenge on uncertain" if config.challenge.mode == "uncertain"
                     else "challenge on every face")
    if config.planar.enabled:
        parts.append("planar")
    return " + ".join(parts) if parts else LIVENESS_OFF


class PassThroughLiveness:
    """No liveness checks: every face is reported as ``skipped`` (never a vote to grant while required)."""

    mode = LIVENESS_OFF

    def assess(
        self, rgb: ImageArray, detection: Detection, track_id: int, timestamp: float,
        mesh: MeshResult | None = None,
    ) -> LivenessResult:
        """Return the skipped result."""
        return LivenessResult.skipped()

    def end_track(self, track_id: int) -> None:
        """Nothing to forget."""
