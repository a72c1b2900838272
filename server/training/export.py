"""int8 export of a trained embedder, calibrated on its own training chips, with the parity check.

The TFLite conversion itself is ``models.convert.export`` (the same code that builds the shipped
embedder); this module only picks the calibration chips, writes the files and measures parity and
latency so the gate can decide.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import numpy.typing as npt

from core.files import atomic_write_bytes, sha256_file

logger = logging.getLogger(__name__)

CALIBRATION_CHIPS = 200  # representative samples for int8 ranges; more moves them by well under 1%
PARITY_CHIPS = 200  # held-out chips for the int8-vs-float cosine
FLOAT_FILE = "embedder-float32.tflite"
INT8_FILE = "embedder-int8.tflite"


@dataclass(frozen=True, slots=True)
class ExportResult:
    """Files written, their sha256, the parity figures and single-thread latencies (ms)."""

    float_path: Path
    int8_path: Path
    float_sha256: str
    int8_sha256: str
    parity_mean_cosine: float
    parity_min_cosine: float
    parity_chips: int
    latency_ms_int8: float
    latency_ms_float: float

    def artifacts(self) -> dict[str, Any]:
        """Registry ``artifacts`` entry."""
        return {"float32": str(self.float_path), "int8": str(self.int8_path),
                "float32_sha256": self.float_sha256, "int8_sha256": self.int8_sha256}

    def parity(self) -> dict[str, Any]:
        """Registry ``metrics['parity']`` entry."""
        return {"mean_cosine": self.parity_mean_cosine, "min_cosine": self.parity_min_cosine,
                "chips": self.parity_chips}


def calibration_chips(train_chips: npt.NDArray[Any], count: int = CALIBRATION_CHIPS,
                      seed: int = 0) -> npt.NDArray[np.float32]:
    """A random draw of training chips as float32, the first one pinned to span 0..255.

    Pinning makes the uint8 input quantization exactly scale 1 / zero point 0, as for the shipped model.
    """
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(train_chips), size=min(count, len(train_chips)), replace=False)
    out = np.asarray(train_chips[idx], np.float32).copy()
    out[0, 0, 0, :], out[0, 0, 1, :] = 0.0, 255.0
    return out


def export_candidate(model: keras.Model, train_chips: npt.NDArray[Any], parity_chips: npt.NDArray[Any],
                     out_dir: Path, seed: int = 0) -> ExportResult:
    """Write float32 and int8 TFLite files of ``model`` and measure int8-vs-float parity on held-out chips."""
    from models.convert.export import cosines, embed_all, export_float32, export_int8, latency_ms

    out_dir.mkdir(parents=True, exist_ok=True)
    float_path, int8_path = out_dir / FLOAT_FILE, out_dir / INT8_FILE
    atomic_write_bytes(float_path, export_float32(model))
    atomic_write_bytes(int8_path, export_int8(model, calibration_chips(train_chips, seed=seed)))
    check = np.asarray(parity_chips[:PARITY_CHIPS], np.float32)
    cos = cosines(embed_all(int8_path, check), embed_all(float_path, check))
    result = ExportResult(float_path, int8_path, sha256_file(float_path), sha256_file(int8_path),
                          float(cos.mean()), float(cos.min()), len(check),
                          latency_ms(int8_path), latency_ms(float_path))
    logger.info("exported %s: int8 parity mean cosine %.4f (min %.4f) on %d held-out chips; "
                "int8 %.2f ms, float %.2f ms (1 thread)", out_dir, result.parity_mean_cosine,
                result.parity_min_cosine, result.parity_chips, result.latency_ms_int8,
                result.latency_ms_float)
    return result
