"""The kiosk's live preview: the latest processed frame, downscaled, with its face boxes, as JPEG.

Cheap on purpose: the frame observer only keeps a reference to the frame and its boxes (no copy, no work
on the processing thread). A frame is downscaled and encoded at most once, on the first stream that asks
for it, and shared by every stream; nothing is encoded while no screen watches. Each stream is paced
to ``[kiosk] preview_fps`` (at most 15). The preview shows processed frames, so its rate is also capped
by the door's processing rate, and each box sits exactly on the face it was computed from.

These JPEGs are camera images: they go only to the kiosk's own HTTP server (loopback by default), never
to a log, an event or the broker.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from core.types import Frame, ImageArray
from device.kiosk.config import KioskConfig
from device.pipeline.frame import FaceView

# Box colours (BGR) by tone; the page says the same thing in words.
TONE_BGR = {"ok": (60, 160, 40), "bad": (40, 40, 210), "warn": (0, 170, 230), "neutral": (235, 235, 235)}
# Downscales to at least this share of the frame use bilinear interpolation, smaller ones area averaging.
LINEAR_MIN_SCALE = 0.5
# Box line width at 480 px of preview width; scaled with the width.
BOX_THICKNESS = 3

Boxes = tuple[tuple[float, float, float, float], ...]


class Preview:
    """Latest frame + boxes in, shared JPEG out. Thread-safe."""

    def __init__(self, config: KioskConfig, tone: Callable[[], str] = lambda: "neutral") -> None:
        self.config = config
        self.tone = tone
        self._cond = threading.Condition()
        self._frame: ImageArray | None = None
        self._boxes: Boxes = ()
        self._seq = 0
        self._encoded: tuple[int, bytes] | None = None
        self._encode_lock = threading.Lock()
        self.encoded_frames = 0  # how many JPEGs were made (the bench and tests read it)

    @property
    def seq(self) -> int:
        """Number of the latest frame (0 before the first)."""
        return self._seq

    def observe(self, frame: Frame, views: Sequence[FaceView]) -> None:
        """Keep the frame and its boxes (frame observer; no copy, no encoding here)."""
        with self._cond:
            self._frame = frame.rgb
            self._boxes = tuple(v.detection.box for v in views)
            self._seq += 1
            self._cond.notify_all()

    def wait_newer(self, seq: int, timeout: float) -> int:
        """Block until a frame newer than ``seq`` arrived (or ``timeout``); return the latest number."""
        with self._cond:
            self._cond.wait_for(lambda: self._seq > seq, timeout)
            return self._seq

    def wake(self) -> None:
        """Wake every waiting stream (on shutdown)."""
        with self._cond:
            self._cond.notify_all()

    def jpeg(self) -> tuple[int, bytes] | None:
        """(frame number, JPEG) of the latest frame, encoded once and shared; None before the first frame."""
        with self._encode_lock:
            with self._cond:
                frame, boxes, seq = self._frame, self._boxes, self._seq
            if frame is None:
                return None
            if self._encoded is not None and self._encoded[0] == seq:
                return self._encoded
            data = encode_preview(frame, boxes, self.config.preview_width, self.config.jpeg_quality,
                                  TONE_BGR.get(self.tone(), TONE_BGR["neutral"]))
            self._encoded = (seq, data)
            self.encoded_frames += 1
            return self._encoded


def encode_preview(rgb: ImageArray, boxes: Boxes, width: int, quality: int,
                   colour: tuple[int, int, int]) -> bytes:
    """Downscale an RGB frame to at most ``width`` pixels wide, draw the boxes, encode as JPEG."""
    height_in, width_in = rgb.shape[:2]
    scale = min(1.0, width / width_in)
    small: npt.NDArray[Any] = np.ascontiguousarray(rgb)
    if scale < 1.0:  # downscale first: the colour conversion then touches fewer pixels
        size = (max(1, round(width_in * scale)), max(1, round(height_in * scale)))
        # Bilinear is 5x cheaper than area averaging for mild downscales and looks the same on a screen;
        # below half size area averaging avoids aliasing.
        method = cv2.INTER_LINEAR if scale >= LINEAR_MIN_SCALE else cv2.INTER_AREA
        small = cv2.resize(small, size, interpolation=method)
    bgr = cv2.cvtColor(small, cv2.COLOR_RGB2BGR)
    thickness = max(1, round(BOX_THICKNESS * bgr.shape[1] / 480))
    for x0, y0, x1, y1 in boxes:
        cv2.rectangle(bgr, (round(x0 * scale), round(y0 * scale)), (round(x1 * scale), round(y1 * scale)),
                      colour, thickness)
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("preview frame could not be JPEG-encoded")
    return bytes(buf.tobytes())
