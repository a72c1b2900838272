"""Open-set decisions over face tracks: tau and margin per frame, k-of-n per track, cooldown per person,
and the access policy (blocked persons, weekly schedule) above recognition."""

from device.decide.access import AccessPolicy, DenyReason
from device.decide.engine import DecisionEngine, FaceObservation
from device.decide.tracks import IOU_MATCH, Track, Tracker, iou

__all__ = ["IOU_MATCH", "AccessPolicy", "DecisionEngine", "DenyReason", "FaceObservation", "Track", "Tracker",
           "iou"]
