"""A V4L2 device index or path, an RTSP/HTTP URL or a video file, read through OpenCV.

When a read fails the capture is released and ``CameraUnavailable`` is raised; the frame loop
reconnects with this source's exponential ``Backoff`` (``reconnect_initial_s`` .. ``reconnect_max_s``).
A video file therefore plays in a loop (the end of file reads as a dropped stream). OpenCV delivers
BGR; frames are converted to RGB.
"""

from __future__ import annotations

import logging
from typing import Any

import cv2
import numpy as np

from core.types import ImageArray
from device.camera.base import Backoff, CameraUnavailable, FrameSource, bgr_to_rgb
from device.config import OpenCVCameraConfig
from models.face.image import as_rgb

logger = logging.getLogger(__name__)


def _redact(source: str) -> str:
    """Drop credentials from an RTSP/HTTP URL before it is logged."""
    if "://" in source and "@" in source:
        scheme, rest = source.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return source


class OpenCVSource(FrameSource):
    """``cv2.VideoCapture`` with reconnect."""

    def __init__(self, source: str, width: int | None = None, height: int | None = None,
                 backoff: Backoff | None = None) -> None:
        super().__init__(f"opencv:{_redact(source)}", backoff)
        self.source = source
        self.width, self.height = width, height
        self._cap: Any = None

    @classmethod
    def from_config(cls, config: OpenCVCameraConfig) -> OpenCVSource:
        """Build from the ``[camera]`` section."""
        return cls(config.source, config.width, config.height,
                   Backoff(config.reconnect_initial_s, config.reconnect_max_s))

    def open(self) -> None:
        """Open the capture; raise CameraUnavailable when OpenCV cannot."""
        if self._cap is not None:
            return
        target: int | str = int(self.source) if self.source.isdigit() else self.source
        cap = cv2.VideoCapture(target)
        if not cap.isOpened():
            cap.release()
            raise CameraUnavailable(f"{self.source_id}: OpenCV cannot open the source")
        if self.width:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.width)
        if self.height:
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.height)
        self._cap = cap
        logger.info("camera %s opened", self.source_id)

    def _grab(self) -> object | None:
        if self._cap is None:
            raise CameraUnavailable(f"{self.source_id}: not open")
        ok, frame = self._cap.read()
        raw: object = frame
        if not ok:
            self.close()
            raise CameraUnavailable(f"{self.source_id}: stream dropped (read failed)")
        return raw

    def _to_rgb(self, raw: object) -> ImageArray:
        return as_rgb(bgr_to_rgb(raw) if isinstance(raw, np.ndarray) else raw)

    def close(self) -> None:
        """Release the capture; safe to call twice."""
        if self._cap is not None:
            self._cap.release()
            self._cap = None
