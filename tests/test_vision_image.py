"""Bad input never crashes the pipeline: every malformed image gets an ImageError with a code."""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np
import pytest

from models.face.image import MAX_PIXELS, ImageError, ImageErrorCode, as_rgb, decode_image, image_size


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG signature + IHDR chunk declaring width x height (no pixel data follows)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


def _jpeg(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return bytes(buf.tobytes())


@pytest.fixture()
def photo() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    ("value", "code"),
    [
        (None, ImageErrorCode.MISSING),
        ([[1, 2], [3, 4]], ImageErrorCode.NOT_ARRAY),
        (np.zeros((0, 0, 3), np.uint8), ImageErrorCode.EMPTY),
        (np.zeros((64, 64, 3), np.uint16), ImageErrorCode.BAD_DTYPE),
        (np.zeros((64, 64, 3), bool), ImageErrorCode.BAD_DTYPE),
        (np.zeros((64, 64, 2), np.uint8), ImageErrorCode.BAD_SHAPE),
        (np.zeros((2, 64, 64, 3), np.uint8), ImageErrorCode.BAD_SHAPE),
        (np.zeros((1, 1, 3), np.uint8), ImageErrorCode.TOO_SMALL),
        (np.zeros((64, 16, 3), np.uint8), ImageErrorCode.TOO_SMALL),
        (np.full((64, 64, 3), np.nan, np.float32), ImageErrorCode.NOT_FINITE),
        (np.full((64, 64, 3), np.inf, np.float64), ImageErrorCode.NOT_FINITE),
        (np.full((64, 64, 3), 300.0, np.float32), ImageErrorCode.OUT_OF_RANGE),
        (np.full((64, 64, 3), -1.0, np.float32), ImageErrorCode.OUT_OF_RANGE),
    ],
    ids=["none", "list", "empty", "uint16", "bool", "2-channels", "4-d", "1x1", "thin", "nan", "inf",
         "above-255", "negative"],
)
def test_as_rgb_rejects(value: object, code: ImageErrorCode) -> None:
    with pytest.raises(ImageError) as info:
        as_rgb(value)
    assert info.value.code is code
    assert code.value in str(info.value)


def test_huge_image_rejected_from_shape_without_allocating() -> None:
    # A read-only broadcast view: 20000x20000x3 "pixels" backed by 3 bytes.
    huge = np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (20000, 20000, 3))
    assert huge.shape[0] * huge.shape[1] > MAX_PIXELS
    with pytest.raises(ImageError) as info:
        as_rgb(huge)
    assert info.value.code is ImageErrorCode.TOO_LARGE
    assert "20000x20000" in str(info.value)


def test_one_nan_pixel_is_rejected() -> None:
    img = np.full((64, 64, 3), 0.5, np.float32)
    img[10, 10, 1] = np.nan
    with pytest.raises(ImageError, match="NaN"):
        as_rgb(img)


def test_grayscale_and_rgba_are_converted(photo: np.ndarray) -> None:
    grey = photo[:, :, 0]
    out = as_rgb(grey)
    assert out.shape == (*grey.shape, 3) and out.dtype == np.uint8
    assert np.array_equal(out[:, :, 0], grey) and np.array_equal(out[:, :, 2], grey)
    assert np.array_equal(as_rgb(grey[:, :, None]), out)
    rgba = np.dstack([photo, np.full(photo.shape[:2], 7, np.uint8)])
    assert np.array_equal(as_rgb(rgba), photo)


def test_floats_are_scaled(photo: np.ndarray) -> None:
    assert np.array_equal(as_rgb(photo.astype(np.float32)), photo)
    unit = as_rgb(photo.astype(np.float64) / 255.0)
    assert np.abs(unit.astype(int) - photo.astype(int)).max() <= 1


def test_uint8_rgb_passes_unchanged(photo: np.ndarray) -> None:
    out = as_rgb(photo)
    assert out is photo or np.array_equal(out, photo)
    assert out.flags["C_CONTIGUOUS"]
    strided = photo[:, ::-1]
    assert as_rgb(strided).flags["C_CONTIGUOUS"]


def test_decode_round_trip(photo: np.ndarray) -> None:
    ok, png = cv2.imencode(".png", cv2.cvtColor(photo, cv2.COLOR_RGB2BGR))
    assert ok
    assert np.array_equal(decode_image(png.tobytes()), photo)
    jpeg = decode_image(_jpeg(photo))
    assert jpeg.shape == photo.shape
    assert image_size(_jpeg(photo)) == (120, 160)


def test_truncated_jpeg_rejected(photo: np.ndarray) -> None:
    data = _jpeg(photo)
    # OpenCV itself would decode this with a grey bottom half.
    with pytest.raises(ImageError) as info:
        decode_image(data[: len(data) // 2])
    assert info.value.code is ImageErrorCode.TRUNCATED
    with pytest.raises(ImageError) as info:
        decode_image(data[:40])
    assert info.value.code in (ImageErrorCode.TRUNCATED, ImageErrorCode.DECODE_FAILED)


def test_truncated_png_rejected(photo: np.ndarray) -> None:
    ok, png = cv2.imencode(".png", photo)
    assert ok
    with pytest.raises(ImageError) as info:
        decode_image(png.tobytes()[:-30])
    assert info.value.code is ImageErrorCode.TRUNCATED


def test_decompression_bomb_rejected_from_header() -> None:
    bomb = _png_header_only(20000, 20000) + b"\x00" * 64
    with pytest.raises(ImageError) as info:
        decode_image(bomb)
    assert info.value.code is ImageErrorCode.TOO_LARGE


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (None, ImageErrorCode.MISSING),
        (b"", ImageErrorCode.EMPTY),
        (b"GIF89a" + b"\x00" * 100, ImageErrorCode.UNSUPPORTED_FORMAT),
        (_png_header_only(0, 10), ImageErrorCode.EMPTY),
        (_png_header_only(1, 1) + b"IEND\xaeB`\x82", ImageErrorCode.TOO_SMALL),
    ],
    ids=["none", "empty", "gif", "zero-width", "1x1"],
)
def test_decode_rejects(data: bytes | None, code: ImageErrorCode) -> None:
    with pytest.raises(ImageError) as info:
        decode_image(data)
    assert info.value.code is code


def test_byte_limit(photo: np.ndarray) -> None:
    data = _jpeg(photo)
    with pytest.raises(ImageError) as info:
        decode_image(data, max_bytes=len(data) - 1)
    assert info.value.code is ImageErrorCode.TOO_LARGE


def test_corrupt_scan_data_fails_cleanly(photo: np.ndarray) -> None:
    data = bytearray(_jpeg(photo))
    garbage = b"\xff\x01" * 10  # TEM markers: legal markers, no image
    bad = bytes(data[:2]) + garbage + b"\xff\xd9"
    with pytest.raises(ImageError):
        decode_image(bad)
