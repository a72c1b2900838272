"""The frame source interface shared by every camera backend, its errors, and frame validation.

A source is opened, read frame by frame and closed. ``read`` returns a ``Frame`` (RGB uint8),
``None`` at the end of a finite stream, and raises ``CameraUnavailable`` when the device or stream
is lost (the frame loop then retries with ``Backoff``). Bad or empty frames are counted in
``bad_frames`` and skipped inside ``read``; they are never fatal.
"""

from __future__ import annotations

import abc
import logging
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt

from core.types import Frame, ImageArray
from models.face.image import ImageError, as_rgb

logger = logging.getLogger(__name__)

# After this many bad frames in a row the source is treated as lost (e.g. a camera streaming garbage).
MAX_BAD_IN_A_ROW = 100
# Reconnect delays for sources whose config has none (replay, picamera2).
DEFAULT_BACKOFF_INITIAL_S = 0.5
DEFAULT_BACKOFF_MAX_S = 10.0


class CameraError(Exception):
    """Base class of frame source errors."""


class CameraUnavailable(CameraError):
    """The camera or stream cannot deliver frames right now; retry later."""


class CameraSetupError(CameraError):
    """The source can never work as configured (missing package, bad parameters); do not retry."""


@dataclass(slots=True)
class Backoff:
    """Exponential reconnect delay: initial, doubling, capped; ``reset`` after a success."""

    initial_s: float = DEFAULT_BACKOFF_INITIAL_S
    max_s: float = DEFAULT_BACKOFF_MAX_S
    _next: float = 0.0

    def next_delay(self) -> float:
        """The delay to wait before the next attempt (and double the one after)."""
        delay = self._next or self.initial_s
        self._next = min(delay * 2.0, self.max_s)
        return min(delay, self.max_s)

    def reset(self) -> None:
        """Start again from the initial delay."""
        self._next = 0.0


class FrameSource(abc.ABC):
    """A camera backend; a context manager whose ``close()`` is safe to call twice."""

    #: Seconds between frames for sources that must be paced (replay); None for live cameras.
    frame_interval_s: float | None = None

    def __init__(self, source_id: str, backoff: Backoff | None = None) -> None:
        self.source_id = source_id
        self.backoff = backoff or Backoff()
        self.bad_frames = 0
        self.frames = 0

    @abc.abstractmethod
    def open(self) -> None:
        """Acquire the device or stream (idempotent); raise CameraUnavailable or CameraSetupError."""

    @abc.abstractmethod
    def _grab(self) -> object | None:
        """Return the next raw image (None-like or invalid = bad frame); raise StopIteration at the end."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the device (idempotent)."""

    def _to_rgb(self, raw: object) -> ImageArray:
        """Validate a raw image as RGB; subclasses override to fix channel order first."""
        return as_rgb(raw)

    def read(self) -> Frame | None:
        """Next good frame, or None at the end of the stream; raise CameraUnavailable when lost."""
        for _ in range(MAX_BAD_IN_A_ROW):
            try:
                raw = self._grab()
            except StopIteration:
                return None
            try:
                rgb = self._to_rgb(raw)
            except ImageError as exc:
                self.bad_frames += 1
                logger.debug("%s: bad frame skipped (%s)", self.source_id, exc.code.value)
                continue
            self.frames += 1
            return Frame(rgb=rgb, timestamp=time.monotonic(), source_id=self.source_id, index=self.frames)
        raise CameraUnavailable(f"{self.source_id}: {MAX_BAD_IN_A_ROW} bad frames in a row")

    def __enter__(self) -> FrameSource:
        self.open()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def bgr_to_rgb(arr: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Reverse the channel order of an (H, W, 3|4) array, dropping a 4th (padding) channel."""
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        return np.ascontiguousarray(arr[:, :, 2::-1])
    return arr
