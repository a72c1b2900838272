"""The Raspberry Pi camera through picamera2 (imported lazily: install the ``pi`` extra / apt package).

We configure a preview stream with ``format="RGB888"``. libcamera names formats by the order of a
little-endian 32-bit word, so ``RGB888`` is stored **B, G, R** in memory: ``capture_array()`` returns
BGR despite the name. We reverse the channels to get RGB. A 4-channel ``XRGB8888`` array (B, G, R, X)
is handled the same way, dropping the padding byte.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

import numpy as np

from core.types import ImageArray
from device.camera.base import Backoff, CameraSetupError, CameraUnavailable, FrameSource, bgr_to_rgb
from device.config import PiCameraConfig
from models.face.image import as_rgb

logger = logging.getLogger(__name__)

PICAMERA2_HINT = ("picamera2 is not installed: on Raspberry Pi OS `apt install python3-picamera2` and create "
                  "the venv with --system-site-packages (or pip install 'facegate[pi]')")


class PiCamera2Source(FrameSource):
    """Frames from ``Picamera2.capture_array()`` on the main stream."""

    def __init__(self, width: int = 640, height: int = 480, backoff: Backoff | None = None) -> None:
        super().__init__("picamera2", backoff)
        self.size = (width, height)
        self._cam: Any = None

    @classmethod
    def from_config(cls, config: PiCameraConfig) -> PiCamera2Source:
        """Build from the ``[camera]`` section."""
        return cls(config.width, config.height)

    def open(self) -> None:
        """Import picamera2, configure the preview stream and start the camera."""
        if self._cam is not None:
            return
        try:
            module = importlib.import_module("picamera2")
        except ImportError as exc:
            raise CameraSetupError(PICAMERA2_HINT) from exc
        cam = None
        try:
            cam = module.Picamera2()
            config = cam.create_preview_configuration(main={"size": self.size, "format": "RGB888"})
            cam.configure(config)
            cam.start()
        except Exception as exc:  # picamera2 raises RuntimeError/IndexError/OSError for absent cameras
            if cam is not None:
                _safe_close(cam)
            raise CameraUnavailable(f"picamera2: cannot start the camera: {exc}") from exc
        self._cam = cam
        logger.info("picamera2 started at %dx%d", *self.size)

    def _grab(self) -> object | None:
        if self._cam is None:
            raise CameraUnavailable("picamera2: not open")
        try:
            frame: object = self._cam.capture_array()
            return frame
        except Exception as exc:  # the camera stack reports a lost sensor through various errors
            self.close()
            raise CameraUnavailable(f"picamera2: capture failed: {exc}") from exc

    def _to_rgb(self, raw: object) -> ImageArray:
        return as_rgb(bgr_to_rgb(raw) if isinstance(raw, np.ndarray) else raw)

    def close(self) -> None:
        """Stop and close the camera; safe to call twice."""
        if self._cam is not None:
            _safe_close(self._cam)
            self._cam = None


def _safe_close(cam: Any) -> None:
    try:
        cam.close()
    except Exception as exc:  # closing must never raise out of cleanup
        logger.warning("picamera2 close failed: %s", exc)
