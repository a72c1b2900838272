"""Camera sources, chosen by ``[camera] type``: ``replay``, ``opencv``, ``picamera2``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from device.camera.base import (
    Backoff,
    CameraError,
    CameraSetupError,
    CameraUnavailable,
    FrameSource,
)
from device.camera.opencv import OpenCVSource
from device.camera.picam import PiCamera2Source
from device.camera.replay import ReplaySource
from device.config import CameraConfig

SOURCES: dict[str, Callable[[Any], FrameSource]] = {
    "replay": ReplaySource.from_config,
    "opencv": OpenCVSource.from_config,
    "picamera2": PiCamera2Source.from_config,
}


def create_source(config: CameraConfig) -> FrameSource:
    """Instantiate (not open) the source the config names."""
    try:
        factory = SOURCES[config.type]
    except KeyError as exc:
        raise CameraSetupError(f"unknown camera type {config.type!r}; known: {sorted(SOURCES)}") from exc
    return factory(config)


__all__ = [
    "SOURCES",
    "Backoff",
    "CameraError",
    "CameraSetupError",
    "CameraUnavailable",
    "FrameSource",
    "OpenCVSource",
    "PiCamera2Source",
    "ReplaySource",
    "create_source",
]
