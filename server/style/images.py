"""Image I/O for style transfer: bounded decoding of untrusted bytes, resizing, PNG encoding, atomic save."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import numpy.typing as npt

ByteImage = npt.NDArray[np.uint8]

# Upload limits: a phone photo is ~5 MB / 12 MP; anything bigger is resized away anyway.
DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_MAX_PIXELS = 25_000_000
# Below this neither the content nor the style survives the backbone's strided layers.
MIN_SIDE_PX = 16
# Written images are ordinary user files (mkstemp would leave them owner-only).
OUTPUT_MODE = 0o644


class StyleInputError(ValueError):
    """An input image was rejected; ``reason`` is a stable code for APIs."""

    reason = "invalid_image"


class ImageTooLargeError(StyleInputError):
    """The upload has too many bytes or too many pixels."""

    reason = "too_large"


class NotAnImageError(StyleInputError):
    """The bytes are not a decodable image."""

    reason = "not_an_image"


def decode_image(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS,
                 label: str = "image") -> ByteImage:
    """Decode untrusted bytes to RGB uint8 (H, W, 3), checking byte and pixel limits before decoding."""
    from PIL import Image, UnidentifiedImageError

    if len(data) == 0:
        raise NotAnImageError(f"{label}: empty upload")
    if len(data) > max_bytes:
        raise ImageTooLargeError(f"{label}: {len(data)} bytes exceeds the limit of {max_bytes} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size  # read from the header: nothing decoded yet
                if width * height > max_pixels:
                    raise ImageTooLargeError(
                        f"{label}: {width}x{height} = {width * height} pixels exceeds {max_pixels}"
                    )
                if min(width, height) < MIN_SIDE_PX:
                    raise StyleInputError(f"{label}: {width}x{height} is under {MIN_SIDE_PX} px a side")
                rgb = img.convert("RGB")
                rgb.load()
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise NotAnImageError(f"{label}: not a readable image ({type(exc).__name__})") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, StyleInputError):
            raise
        raise NotAnImageError(f"{label}: corrupt or truncated image ({exc})") from exc
    return np.asarray(rgb, dtype=np.uint8).copy()


def read_image(path: Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> ByteImage:
    """Read an image file from disk with the same checks as an upload (no byte limit)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise StyleInputError(f"cannot read {path}: {exc.strerror}") from exc
    return decode_image(data, max_bytes=max(len(data), 1), max_pixels=max_pixels, label=str(path))


def resize_longest(rgb: ByteImage, size: int) -> ByteImage:
    """Resize so the longest side is ``size`` px, keeping the aspect ratio (Lanczos)."""
    from PIL import Image

    height, width = rgb.shape[:2]
    scale = size / max(height, width)
    new = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(rgb).resize(new, Image.Resampling.LANCZOS), dtype=np.uint8)


def resize_to(rgb: ByteImage, height: int, width: int) -> ByteImage:
    """Resize to exactly (height, width), as the style image must match G's shape."""
    from PIL import Image

    return np.asarray(Image.fromarray(rgb).resize((width, height), Image.Resampling.LANCZOS), dtype=np.uint8)


def encode_png(rgb: ByteImage) -> bytes:
    """RGB uint8 -> PNG bytes (optimised, as results are stored and served)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def make_strip(frames: list[ByteImage]) -> ByteImage:
    """Lay intermediate images side by side (all have G's shape)."""
    if not frames:
        raise ValueError("no frames for a strip")
    return np.concatenate(frames, axis=1)
