"""Open-set decisions over face tracks: tau and margin per frame, k-of-n per track, cooldown per person,
and the access policy (blocked persons, weekly schedule) above recognition.

The names below are imported on first use: ``device.config`` imports the calibrated operating point
(:mod:`device.decide.operating_point`) for its defaults, and the engine imports ``device.config``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from device.decide.access import AccessPolicy, DenyReason
    from device.decide.decision import DecisionEngine, FaceObservation
    from device.decide.tracks import IOU_MATCH, Track, Tracker, iou

_HOMES = {
    "AccessPolicy": "access", "DenyReason": "access",
    "DecisionEngine": "decision", "FaceObservation": "decision",
    "IOU_MATCH": "tracks", "Track": "tracks", "Tracker": "tracks", "iou": "tracks",
}

__all__ = ["IOU_MATCH", "AccessPolicy", "DecisionEngine", "DenyReason", "FaceObservation", "Track", "Tracker",
           "iou"]


def __getattr__(name: str) -> Any:
    """Import a public name from its submodule on first use."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'device.decide' has no attribute {name!r}")
    return getattr(importlib.import_module(f"device.decide.{home}"), name)
