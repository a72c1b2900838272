"""Associate face boxes across frames into tracks by IoU, so decisions can vote over a short window.

Greedy association: all (track, box) pairs above ``IOU_MATCH`` are taken best-first, each track and box
at most once; an unmatched box starts a new track; a track unseen for ``timeout_s`` ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

Box = tuple[float, float, float, float]

# A walking face at 5-15 fps moves well under half its width per frame; 0.3 keeps the track through
# that while two people side by side (IoU ~0) never merge.
IOU_MATCH = 0.3


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@dataclass(slots=True)
class Track:
    """Geometry and timing of one tracked face."""

    track_id: int
    box: Box
    first_seen: float
    last_seen: float
    frames: int = 1


class Tracker:
    """Assigns track ids to face boxes frame after frame."""

    def __init__(self, timeout_s: float, iou_threshold: float = IOU_MATCH) -> None:
        self.timeout_s = timeout_s
        self.iou_threshold = iou_threshold
        self._tracks: dict[int, Track] = {}
        self._next_id = 1

    @property
    def active(self) -> dict[int, Track]:
        """Live tracks by id (a copy)."""
        return dict(self._tracks)

    def expire(self, now: float) -> list[int]:
        """End tracks unseen for longer than the timeout; return their ids."""
        ended = [tid for tid, t in self._tracks.items() if now - t.last_seen > self.timeout_s]
        for tid in ended:
            del self._tracks[tid]
        return ended

    def assign(self, boxes: Sequence[Box], now: float) -> list[int]:
        """Track id for each box, in order (call ``expire`` first to end stale tracks)."""
        pairs = sorted(
            ((iou(t.box, box), tid, j) for tid, t in self._tracks.items() for j, box in enumerate(boxes)),
            reverse=True,
        )
        result: list[int | None] = [None] * len(boxes)
        used: set[int] = set()
        for overlap, tid, j in pairs:  # best overlap first
            if overlap < self.iou_threshold:
                break
            if tid in used or result[j] is not None:
                continue
            used.add(tid)
            result[j] = tid
            track = self._tracks[tid]
            track.box, track.last_seen, track.frames = boxes[j], now, track.frames + 1
        ids: list[int] = []
        for j, found in enumerate(result):
            if found is None:
                found = self._next_id
                self._next_id += 1
                self._tracks[found] = Track(found, boxes[j], now, now)
            ids.append(found)
        return ids

    def clear(self) -> list[int]:
        """End every track (camera loss); return their ids."""
        ended = list(self._tracks)
        self._tracks.clear()
        return ended
