"""The opt-in event snapshot: a small JPEG of the face region (see :mod:`core.protocol.snapshots`).

The crop is the detection box grown by ``SNAPSHOT_MARGIN`` on every side (clipped to the frame), scaled
down so its longest side is at most ``SNAPSHOT_MAX_SIDE`` pixels, and JPEG-encoded. It is made on the
processing thread only for ``unknown``/``spoof`` decisions when a sink asks for snapshots: about a
millisecond for a 256 px crop, once per track. The bytes are biometric data: never log them.
"""

from __future__ import annotations

import cv2
import numpy as np

from core.types import ImageArray

# 256 px shows a face well enough for a guard to recognise it while keeping a JPEG near 10-20 KB.
SNAPSHOT_MAX_SIDE = 256
# Grow the box by this fraction of its size on each side: BlazeFace boxes cut hair and chin.
SNAPSHOT_MARGIN = 0.25
# JPEG quality: 85 keeps faces sharp at about half the bytes of 95.
SNAPSHOT_JPEG_QUALITY = 85

Box = tuple[float, float, float, float]


class SnapshotError(ValueError):
    """The face region is empty or the JPEG could not be encoded."""


def face_crop(rgb: ImageArray, box: Box, margin: float = SNAPSHOT_MARGIN,
              max_side: int = SNAPSHOT_MAX_SIDE) -> ImageArray:
    """The box plus ``margin`` on each side, clipped to the frame and shrunk to ``max_side`` (RGB)."""
    height, width = rgb.shape[:2]
    x0, y0, x1, y1 = box
    dx, dy = (x1 - x0) * margin, (y1 - y0) * margin
    left, top = max(0, int(np.floor(x0 - dx))), max(0, int(np.floor(y0 - dy)))
    right, bottom = min(width, int(np.ceil(x1 + dx))), min(height, int(np.ceil(y1 + dy)))
    if right - left < 1 or bottom - top < 1:
        raise SnapshotError(f"face box {box} lies outside the {width}x{height} frame")
    crop = rgb[top:bottom, left:right]
    longest = max(crop.shape[0], crop.shape[1])
    if longest > max_side:
        scale = max_side / longest
        size = (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale)))
        crop = np.asarray(cv2.resize(crop, size, interpolation=cv2.INTER_AREA), dtype=np.uint8)
    return np.ascontiguousarray(crop)


def encode_snapshot(rgb: ImageArray, box: Box, margin: float = SNAPSHOT_MARGIN,
                    max_side: int = SNAPSHOT_MAX_SIDE, quality: int = SNAPSHOT_JPEG_QUALITY) -> bytes:
    """JPEG bytes of the face region of an RGB frame."""
    crop = face_crop(rgb, box, margin, max_side)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(crop, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise SnapshotError("OpenCV could not encode the snapshot as JPEG")
    return bytes(buf.tobytes())
