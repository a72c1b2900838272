"""Open-set decisions over face tracks: tau and margin per frame, k-of-n per track, cooldown per person."""

from device.decide.engine import DecisionEngine, FaceObservation
from device.decide.tracks import IOU_MATCH, Track, Tracker, iou

__all__ = ["IOU_MATCH", "DecisionEngine", "FaceObservation", "Track", "Tracker", "iou"]
