"""Chips for training and evaluation, cut by the product's own pipeline and cached as one .npz per dataset.

The cache file name carries a hash of the image list (keys and sizes) and of the chip maker's id, so a
changed dataset or a changed pipeline never reuses stale chips. Images whose face is not found are
recorded as failures (their chip is zeros and ``ok`` is False).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt

from core.files import atomic_write_bytes
from server.training.data import DataError, Sample
from server.training.progress import progress_bar

logger = logging.getLogger(__name__)

CHIP_SIZE = 150
CACHE_ENV = "FACEGATE_CACHE_DIR"
CACHE_VERSION = 1  # bump when the cache layout changes


class ChipMaker(Protocol):
    """Turns an image file into an aligned 150x150 RGB uint8 chip, or None when no face is found."""

    ident: str

    def __call__(self, path: Path) -> npt.NDArray[np.uint8] | None: ...


@dataclass(frozen=True, slots=True)
class ChipSet:
    """Chips (N,150,150,3) uint8 of a sample list, an ok mask, the keys and the identities."""

    chips: npt.NDArray[np.uint8]
    ok: npt.NDArray[np.bool_]
    keys: list[str]
    identities: list[str]
    cache_id: str

    def select(self, keep: npt.NDArray[np.bool_]) -> ChipSet:
        """A subset by boolean mask."""
        idx = np.flatnonzero(keep)
        return ChipSet(self.chips[idx], self.ok[idx], [self.keys[i] for i in idx],
                       [self.identities[i] for i in idx], self.cache_id)

    def only_ok(self) -> ChipSet:
        """Only the samples whose face was found."""
        return self.select(self.ok)

    def lookup(self) -> dict[str, int]:
        """Key -> row index."""
        return {key: i for i, key in enumerate(self.keys)}


def default_cache_dir() -> Path:
    """``$FACEGATE_CACHE_DIR/chips`` or ``~/.cache/facegate/chips`` (never inside the repository)."""
    base = os.environ.get(CACHE_ENV)
    return (Path(base) if base else Path.home() / ".cache" / "facegate") / "chips"


def cache_id(samples: Sequence[Sample], maker_ident: str) -> str:
    """Hash of the sample list (key, identity, file size) and the chip maker's id."""
    digest = hashlib.sha256(f"v{CACHE_VERSION}|{maker_ident}".encode())
    for s in samples:
        size = s.path.stat().st_size if s.path.is_file() else -1
        digest.update(f"{s.key}\t{s.identity}\t{size}\n".encode())
    return digest.hexdigest()[:16]


def _save(path: Path, chipset: ChipSet) -> None:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, chips=chipset.chips, ok=chipset.ok, keys=np.array(chipset.keys),
             identities=np.array(chipset.identities))
    atomic_write_bytes(path, buffer.getvalue(), mode=0o600)  # face chips are biometric data


def _load(path: Path, ident: str) -> ChipSet | None:
    try:
        with np.load(path, allow_pickle=False) as data:
            return ChipSet(data["chips"], data["ok"], [str(k) for k in data["keys"]],
                           [str(i) for i in data["identities"]], ident)
    except (OSError, ValueError, KeyError) as exc:
        logger.warning("ignoring unreadable chip cache %s: %s", path, exc)
        return None


def make_chips(samples: Sequence[Sample], maker: ChipMaker, cache_dir: Path | None = None,
               name: str = "dataset", progress: bool = True) -> ChipSet:
    """Chips of every sample via ``maker``, read from / written to the cache."""
    if not samples:
        raise DataError("no samples to cut chips from")
    ident = cache_id(samples, maker.ident)
    folder = cache_dir or default_cache_dir()
    path = folder / f"{name}-{ident}.npz"
    if path.is_file():
        cached = _load(path, ident)
        if cached is not None and len(cached.keys) == len(samples):
            logger.info("chips from cache %s (%d, %d without a face)", path, len(samples),
                        int((~cached.ok).sum()))
            return cached
    chips = np.zeros((len(samples), CHIP_SIZE, CHIP_SIZE, 3), np.uint8)
    ok = np.zeros(len(samples), bool)
    with progress_bar("cutting chips", len(samples), enabled=progress) as advance:
        for i, sample in enumerate(samples):
            chip = maker(sample.path)
            if chip is not None:
                chips[i], ok[i] = chip, True
            advance(1)
    chipset = ChipSet(chips, ok, [s.key for s in samples], [s.identity for s in samples], ident)
    _save(path, chipset)
    logger.info("cut %d chips (%d without a face) into %s", len(samples), int((~ok).sum()), path)
    return chipset


class PipelineChipMaker:
    """The product's detect + align pipeline as a ChipMaker (largest face of each image); closeable."""

    def __init__(self, models_dir: Path | None = None) -> None:
        from device.vision.pipeline import FacePipeline  # heavy: only when chips are actually cut

        self._pipeline = FacePipeline.from_models_dir(models_dir) if models_dir else FacePipeline.default()
        # The chips depend on the detector and the alignment, not on the embedder in the same manifest.
        pipe = self._pipeline
        self.ident = f"pipeline:{pipe.detector.spec.manifest_name}+{pipe.align_method.value}"

    def __call__(self, path: Path) -> npt.NDArray[np.uint8] | None:
        """The chip of the largest face, or None (no face, or an unreadable image: logged, not raised)."""
        from models.face.image import ImageError, decode_image

        try:
            rgb = decode_image(path.read_bytes())
        except (OSError, ImageError) as exc:
            logger.warning("skipping unreadable image %s: %s", path.name, exc)
            return None
        chip = self._pipeline.largest_chip(rgb)
        return None if chip is None else np.asarray(chip.rgb, np.uint8)

    def close(self) -> None:
        """Release the pipeline's interpreters (safe to call twice)."""
        self._pipeline.close()

    def __enter__(self) -> PipelineChipMaker:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
