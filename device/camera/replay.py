"""Replay a folder of images (sorted by name) or a video file, once or looped, at a set frame rate.

Tests and the demo use it. Images go through ``decode_image`` (size, bomb and truncation checks);
an unreadable file is a bad frame, counted and skipped. If the folder or video disappears while
replaying, ``read`` raises ``CameraUnavailable`` and the frame loop reconnects when it is back.
Pacing is the frame loop's job: it waits ``frame_interval_s`` between reads on its stop event.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import cv2

from core.types import ImageArray
from device.camera.base import Backoff, CameraUnavailable, FrameSource, bgr_to_rgb
from device.config import ReplayCameraConfig
from models.face.image import ImageError, ImageErrorCode, as_rgb, decode_image

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})


class _Raw:
    """A frame already converted to RGB, or the reason it is bad."""

    __slots__ = ("error", "rgb")

    def __init__(self, rgb: ImageArray | None = None, error: ImageError | None = None) -> None:
        self.rgb, self.error = rgb, error


class ReplaySource(FrameSource):
    """Images from a folder or frames from a video file."""

    def __init__(self, path: Path, fps: float = 10.0, loop: bool = False, source_id: str | None = None,
                 backoff: Backoff | None = None) -> None:
        super().__init__(source_id or f"replay:{Path(path).name}", backoff)
        self.path = Path(path)
        self.loop = loop
        self.frame_interval_s = 1.0 / fps
        self._files: list[Path] = []
        self._pos = 0
        self._video: Any = None
        self._opened = False

    @classmethod
    def from_config(cls, config: ReplayCameraConfig) -> ReplaySource:
        """Build from the ``[camera]`` section."""
        return cls(config.path, config.fps, config.loop)

    def _list(self) -> list[Path]:
        try:
            found = (p for p in self.path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            return sorted(p for p in found if p.is_file())
        except OSError as exc:
            raise CameraUnavailable(f"{self.source_id}: cannot list {self.path}: {exc}") from exc

    def open(self) -> None:
        """List the folder or open the video; raise CameraUnavailable if it is missing or empty."""
        if self._opened:
            return
        if self.path.is_dir():
            self._files = self._list()
            if not self._files:
                raise CameraUnavailable(f"{self.source_id}: no .jpg/.png images in {self.path}")
        elif self.path.is_file():
            self._video = cv2.VideoCapture(str(self.path))
            if not self._video.isOpened():
                self._video = None
                raise CameraUnavailable(f"{self.source_id}: OpenCV cannot open video {self.path}")
        else:
            raise CameraUnavailable(f"{self.source_id}: {self.path} does not exist")
        self._pos = 0
        self._opened = True
        logger.info("replay source %s opened (%s)", self.source_id,
                    f"{len(self._files)} images" if self._files else "video")

    def _grab(self) -> object | None:
        if not self._opened:
            raise CameraUnavailable(f"{self.source_id}: not open")
        if self._video is not None:
            return self._grab_video()
        if self._pos >= len(self._files):
            if not self.loop:
                raise StopIteration
            self._files, self._pos = self._list(), 0
            if not self._files:
                self.close()
                raise CameraUnavailable(f"{self.source_id}: {self.path} has no images any more")
        path = self._files[self._pos]
        self._pos += 1
        try:
            data = path.read_bytes()
        except OSError as exc:
            if not self.path.is_dir():
                self.close()
                raise CameraUnavailable(f"{self.source_id}: {self.path} disappeared") from exc
            return _Raw(error=ImageError(ImageErrorCode.MISSING, f"cannot read {path.name}: {exc}"))
        try:
            return _Raw(rgb=decode_image(data))
        except ImageError as exc:
            return _Raw(error=exc)

    def _grab_video(self) -> object | None:
        ok, frame = self._video.read()
        if ok:
            return _Raw(rgb=as_rgb(bgr_to_rgb(frame))) if frame is not None else None
        if not self.path.is_file():
            self.close()
            raise CameraUnavailable(f"{self.source_id}: {self.path} disappeared")
        if not self.loop:
            raise StopIteration
        self._video.set(cv2.CAP_PROP_POS_FRAMES, 0)
        ok, frame = self._video.read()
        if not ok:
            self.close()
            raise CameraUnavailable(f"{self.source_id}: cannot rewind {self.path}")
        return _Raw(rgb=as_rgb(bgr_to_rgb(frame)))

    def _to_rgb(self, raw: object) -> ImageArray:
        if isinstance(raw, _Raw):
            if raw.error is not None:
                raise raw.error
            if raw.rgb is not None:
                return raw.rgb
        return super()._to_rgb(raw)

    def close(self) -> None:
        """Release the video (if any); safe to call twice."""
        if self._video is not None:
            self._video.release()
            self._video = None
        self._opened = False
