"""Track-level fusion: search the mean embedding of a track's best frames instead of each frame alone.

A door sees the same face in many consecutive frames. Each frame's embedding carries its own noise
(landmarks, blur, a half-closed eye), so the loop can search, for every frame, the normalised mean of
the embeddings of the ``frames`` best-quality frames of the track so far (chip quality: detection
score discounted by the landmark fit). The decision rules of ``device.decide.decision`` are unchanged:
each frame still votes, with the fused match. ``frames = 1`` searches each frame on its own.

The fused vector belongs to one track only; it is dropped when the track ends. Embeddings are kept in
memory for the life of the track and never logged.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

import numpy as np

from core.types import FloatArray


@dataclass(slots=True)
class _TrackFrames:
    """The best frames of one track as a min-heap on quality (the worst is replaced first)."""

    heap: list[tuple[float, int, FloatArray]] = field(default_factory=list)


class TrackFusion:
    """Keeps each track's ``frames`` best embeddings and returns their normalised mean."""

    def __init__(self, frames: int) -> None:
        if frames < 1:
            raise ValueError(f"frames must be >= 1, got {frames}")
        self.frames = frames
        self._tracks: dict[int, _TrackFrames] = {}
        self._order = itertools.count()  # ties on quality keep the earlier frame

    def update(self, track_id: int, vector: FloatArray, quality: float) -> FloatArray:
        """Add one frame's unit embedding to its track; return the vector to search."""
        if self.frames == 1:
            return vector
        state = self._tracks.setdefault(track_id, _TrackFrames())
        item = (float(quality), next(self._order), np.asarray(vector, np.float32))
        if len(state.heap) < self.frames:
            heapq.heappush(state.heap, item)
        elif item[0] > state.heap[0][0]:
            heapq.heapreplace(state.heap, item)
        fused = np.sum([v for _, _, v in state.heap], axis=0)
        out: FloatArray = (fused / max(float(np.linalg.norm(fused)), 1e-12)).astype(np.float32)
        return out

    def end_track(self, track_id: int) -> None:
        """Forget an ended track."""
        self._tracks.pop(track_id, None)

    def reset(self) -> None:
        """Forget every track."""
        self._tracks.clear()
