"""Input validation and decoding: every image entering the pipeline passes through here.

``as_rgb`` turns what a caller hands us into a C-contiguous ``uint8`` (H, W, 3) RGB array, or raises
``ImageError`` with a code and a message saying what was wrong and what to do. What it accepts:

- ``uint8`` (H, W, 3): taken as RGB, unchanged.
- grayscale, (H, W) or (H, W, 1): replicated to three channels (a grey camera still enrolls and matches).
- (H, W, 4) RGBA: the alpha channel is dropped (not composited: a kiosk frame has no transparency).
- finite floats: values in [0, 1] are scaled by 255; otherwise values must lie in [0, 255] and are rounded.
  A float image whose maximum is <= 1 is always read as [0, 1] (so an almost black [0, 255] float image
  is misread; pass ``uint8`` to avoid the ambiguity). NaN or inf is rejected.

Rejected: None, non-arrays, empty arrays, other dtypes (bool, uint16, ...), other channel counts, images
with a side below ``MIN_SIDE_PX`` and images above ``MAX_PIXELS`` (checked on the shape, before any copy).

``decode_image`` reads JPEG or PNG bytes. It reads the pixel size from the file header and rejects a
decompression bomb before decoding, and rejects truncated files (OpenCV would return a partly grey image
for a truncated JPEG without complaint).
"""

from __future__ import annotations

import enum
import struct
from typing import Any

import cv2
import numpy as np

from core.types import ImageArray

# Faces smaller than ~20 px cannot be recognised; 32 px leaves room for the detector's context.
MIN_SIDE_PX = 32
# 40 Mpx covers an 8K (33 Mpx) frame; above that a single image costs >120 MB as RGB on a Pi.
MAX_PIXELS = 40_000_000
# Uploads (enrollment photos) above this many bytes are refused before parsing.
MAX_BYTES = 20 * 1024 * 1024

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_EOI = b"\xff\xd9"
_JPEG_SOS = 0xDA
# SOF markers carry the frame size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but are not SOFs.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field (TEM, RSTn, SOI, EOI).
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xDA)})


class ImageErrorCode(enum.StrEnum):
    """Why an image was refused."""

    MISSING = "missing"
    NOT_ARRAY = "not_array"
    EMPTY = "empty"
    BAD_DTYPE = "bad_dtype"
    BAD_SHAPE = "bad_shape"
    NOT_FINITE = "not_finite"
    OUT_OF_RANGE = "out_of_range"
    TOO_SMALL = "too_small"
    TOO_LARGE = "too_large"
    UNSUPPORTED_FORMAT = "unsupported_format"
    TRUNCATED = "truncated"
    DECODE_FAILED = "decode_failed"


class ImageError(ValueError):
    """An input image is unusable; ``code`` says why, the message says what to do."""

    def __init__(self, code: ImageErrorCode, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code


def _check_size(height: int, width: int, max_pixels: int, min_side: int) -> None:
    """Reject images that are too small or too large, from the size alone."""
    if height * width > max_pixels:
        raise ImageError(ImageErrorCode.TOO_LARGE,
                         f"image is {width}x{height} = {height * width} pixels, above the limit of "
                         f"{max_pixels}; downscale it first")
    if min(height, width) < min_side:
        raise ImageError(ImageErrorCode.TOO_SMALL,
                         f"image is {width}x{height}; each side must be at least {min_side} px")


def _to_uint8(arr: np.ndarray[Any, Any]) -> ImageArray:
    """Convert a uint8 or finite float array to uint8, or raise ImageError."""
    if arr.dtype == np.uint8:
        return arr
    if not np.issubdtype(arr.dtype, np.floating):
        raise ImageError(ImageErrorCode.BAD_DTYPE,
                         f"dtype {arr.dtype} is not supported; pass uint8 RGB (or floats in [0, 1])")
    if not np.all(np.isfinite(arr)):
        raise ImageError(ImageErrorCode.NOT_FINITE, "image contains NaN or infinite values")
    low, high = float(arr.min()), float(arr.max())
    if low < 0.0 or high > 255.0:
        raise ImageError(ImageErrorCode.OUT_OF_RANGE,
                         f"float image values span [{low:g}, {high:g}]; expected [0, 1] or [0, 255]")
    scaled = arr * 255.0 if high <= 1.0 else arr
    return np.rint(scaled).astype(np.uint8)


def as_rgb(arr: object, *, max_pixels: int = MAX_PIXELS, min_side: int = MIN_SIDE_PX) -> ImageArray:
    """Validate an image array and return it as C-contiguous uint8 (H, W, 3) RGB; raise ImageError."""
    if arr is None:
        raise ImageError(ImageErrorCode.MISSING, "no image (None) was given")
    if not isinstance(arr, np.ndarray):
        raise ImageError(ImageErrorCode.NOT_ARRAY,
                         f"expected a numpy array, got {type(arr).__name__}; use decode_image for bytes")
    if arr.size == 0:
        raise ImageError(ImageErrorCode.EMPTY, f"image array is empty (shape {arr.shape})")
    if arr.ndim == 2:
        channels = 1
    elif arr.ndim == 3 and arr.shape[2] in (1, 3, 4):
        channels = int(arr.shape[2])
    else:
        raise ImageError(ImageErrorCode.BAD_SHAPE,
                         f"shape {arr.shape} is not an image; expected (H, W), (H, W, 1), (H, W, 3) "
                         "or (H, W, 4)")
    height, width = int(arr.shape[0]), int(arr.shape[1])
    _check_size(height, width, max_pixels, min_side)  # before any conversion allocates memory
    pixels = _to_uint8(arr)
    if channels == 4:
        pixels = pixels[:, :, :3]
    elif channels == 1:
        grey = pixels.reshape(height, width, 1)
        pixels = np.repeat(grey, 3, axis=2)
    return np.ascontiguousarray(pixels)


def _jpeg_size(data: bytes) -> tuple[int, int, int]:
    """(height, width, offset of the first SOS) from the JPEG segment headers, or raise ImageError."""
    pos = 2
    size: tuple[int, int] | None = None
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise ImageError(ImageErrorCode.DECODE_FAILED, f"corrupt JPEG: no marker at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        if marker in _JPEG_SOF and pos + 9 <= len(data):
            height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
            size = (int(height), int(width))
        if marker == _JPEG_SOS:
            if size is None:
                raise ImageError(ImageErrorCode.DECODE_FAILED, "corrupt JPEG: scan before frame header")
            return size[0], size[1], pos
        pos += 2 + int(length)
    raise ImageError(ImageErrorCode.TRUNCATED, "JPEG ends inside its headers (truncated file)")


def _png_size(data: bytes) -> tuple[int, int]:
    """(height, width) from the PNG IHDR chunk, or raise ImageError."""
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise ImageError(ImageErrorCode.TRUNCATED, "PNG is shorter than its header (truncated file)")
    width, height = struct.unpack(">II", data[16:24])
    return int(height), int(width)


def image_size(data: bytes) -> tuple[int, int]:
    """(height, width) of JPEG or PNG bytes, read from the header without decoding pixels."""
    if data.startswith(_JPEG_MAGIC):
        height, width, _ = _jpeg_size(data)
        return height, width
    if data.startswith(_PNG_MAGIC):
        return _png_size(data)
    raise ImageError(ImageErrorCode.UNSUPPORTED_FORMAT, "not a JPEG or PNG file (unknown signature)")


def _check_complete(data: bytes) -> None:
    """Raise ImageError(TRUNCATED) when the file's end marker is missing."""
    if data.startswith(_JPEG_MAGIC):
        _, _, sos = _jpeg_size(data)
        # Entropy-coded data escapes 0xFF as FF 00, so FF D9 after the first scan can only be the EOI.
        if data.find(_JPEG_EOI, sos) < 0:
            raise ImageError(ImageErrorCode.TRUNCATED,
                             "JPEG has no end-of-image marker (truncated upload?); send the whole file")
    elif b"IEND" not in data[-16:]:
        raise ImageError(ImageErrorCode.TRUNCATED,
                         "PNG has no IEND chunk (truncated upload?); send the whole file")


def decode_image(data: bytes | bytearray | memoryview | None, *, max_bytes: int = MAX_BYTES,
                 max_pixels: int = MAX_PIXELS, min_side: int = MIN_SIDE_PX) -> ImageArray:
    """Decode JPEG/PNG bytes to uint8 RGB after size, bomb and truncation checks; raise ImageError."""
    if data is None:
        raise ImageError(ImageErrorCode.MISSING, "no image bytes (None) were given")
    raw = bytes(data)
    if not raw:
        raise ImageError(ImageErrorCode.EMPTY, "image bytes are empty")
    if len(raw) > max_bytes:
        raise ImageError(ImageErrorCode.TOO_LARGE,
                         f"image file is {len(raw)} bytes, above the limit of {max_bytes}")
    height, width = image_size(raw)
    if height == 0 or width == 0:
        raise ImageError(ImageErrorCode.EMPTY, f"image header declares a {width}x{height} image")
    _check_size(height, width, max_pixels, min_side)
    _check_complete(raw)
    decoded = cv2.imdecode(np.frombuffer(raw, dtype=np.uint8), cv2.IMREAD_COLOR_RGB)
    if decoded is None:
        raise ImageError(ImageErrorCode.DECODE_FAILED, "the image data could not be decoded (corrupt file)")
    return as_rgb(np.asarray(decoded, dtype=np.uint8), max_pixels=max_pixels, min_side=min_side)
