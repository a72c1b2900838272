"""The face embedder: dlib's ResNet converted to TFLite (float32 or int8), run through LiteRT.

The model takes a 150x150 RGB chip with values 0..255 as float (its own first layer normalises)
and returns 128 numbers; we L2-normalise them so that cosine similarity is a dot product. With
``FLIP_FUSION`` (the default) the chip's mirror image is embedded too and the two are averaged.
Every embedding carries the sha256 of the model file, checked against the manifest on load.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import TracebackType
from typing import Literal

import numpy as np

from core.files import sha256_file
from core.types import Chip, Embedding, FloatArray, ImageArray
from models.runtime.interpreter import TFLiteModel
from models.runtime.manifest import ModelEntry, load_manifest, verify_entry

logger = logging.getLogger(__name__)

EmbedderVariant = Literal["int8", "float32"]
EMBEDDER_ENTRIES: dict[str, str] = {"int8": "embedder-int8", "float32": "embedder-float32"}
CHIP_SHAPE = (150, 150, 3)
EMBEDDING_DIM = 128
# Test-time horizontal-flip fusion: the embedding is the normalised mean of the chip's and its mirror
# image's (the chip template is left/right symmetric, so the mirror is a valid chip). It costs one more
# embedder run (~2 ms int8) and lowered one-shot FNIR at FPIR 1e-3 from 0.367 to 0.322 (1e-2: 0.227 to
# 0.199) on the lever study's tune identities (`python -m server.evaluation.levers`, README).
FLIP_FUSION = True


class EmbedderError(Exception):
    """The embedder cannot be loaded or its input is not a chip."""


class Embedder:
    """Chip -> L2-normalised 128-d ``Embedding``; a context manager with idempotent ``close()``."""

    def __init__(self, model_path: Path, sha256: str, version: str = "", threads: int = 1,
                 flip_fusion: bool = FLIP_FUSION) -> None:
        self.path = Path(model_path)
        self.sha256 = sha256
        self.version = version
        self.flip_fusion = flip_fusion
        self.model = TFLiteModel(self.path, threads=threads)
        expected = (1, *CHIP_SHAPE)
        if self.model.input.shape != expected:
            self.model.close()
            raise EmbedderError(f"{self.path.name} input is {self.model.input.shape}, expected {expected}")

    @classmethod
    def from_models_dir(cls, models_dir: Path, variant: EmbedderVariant = "int8", threads: int = 1,
                        flip_fusion: bool = FLIP_FUSION) -> Embedder:
        """Load ``embedder-<variant>`` from a built models folder after checking its sha256."""
        if variant not in EMBEDDER_ENTRIES:
            raise EmbedderError(f"unknown embedder variant '{variant}' (known: {sorted(EMBEDDER_ENTRIES)})")
        manifest = load_manifest(models_dir)
        entry = manifest.get(EMBEDDER_ENTRIES[variant])
        return cls.from_entry(models_dir, entry, threads, flip_fusion)

    @classmethod
    def from_entry(cls, models_dir: Path, entry: ModelEntry, threads: int = 1,
                   flip_fusion: bool = FLIP_FUSION) -> Embedder:
        """Load a manifest entry (raises ManifestError when the file's sha256 does not match)."""
        path = verify_entry(models_dir, entry)
        return cls(path, entry.sha256, entry.version, threads, flip_fusion)

    @classmethod
    def from_file(cls, model_path: Path, threads: int = 1, flip_fusion: bool = FLIP_FUSION) -> Embedder:
        """Load a bare ``.tflite`` (tests, experiments); the sha256 is computed from the file."""
        return cls(model_path, sha256_file(Path(model_path)), "", threads, flip_fusion)

    def _run(self, chip: ImageArray) -> FloatArray:
        """The network's unit output for one chip."""
        out = self.model.run(chip.astype(np.float32)[None]).reshape(-1)
        if out.size != EMBEDDING_DIM or not np.all(np.isfinite(out)):
            raise EmbedderError(f"{self.path.name} returned {out.size} values (finite: "
                                f"{bool(np.all(np.isfinite(out)))}), expected {EMBEDDING_DIM}")
        norm = float(np.linalg.norm(out))
        unit: FloatArray = (out / norm if norm > 0 else out).astype(np.float32)
        return unit

    def vector(self, chip_rgb: ImageArray) -> FloatArray:
        """The L2-normalised embedding of a (150, 150, 3) uint8 chip (fused with its mirror when set)."""
        arr = np.asarray(chip_rgb)
        if arr.shape != CHIP_SHAPE or arr.dtype != np.uint8:
            raise EmbedderError(f"chip must be uint8 {CHIP_SHAPE}, got {arr.dtype} {arr.shape}")
        unit = self._run(arr)
        if not self.flip_fusion:
            return unit
        fused = unit + self._run(np.ascontiguousarray(arr[:, ::-1]))
        out: FloatArray = (fused / max(float(np.linalg.norm(fused)), 1e-12)).astype(np.float32)
        return out

    def embed(self, chip: Chip) -> Embedding:
        """Embed an aligned chip."""
        return Embedding(vector=self.vector(chip.rgb), model_sha256=self.sha256)

    def close(self) -> None:
        """Release the interpreter (safe to call twice)."""
        self.model.close()

    def __enter__(self) -> Embedder:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
