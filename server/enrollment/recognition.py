"""The enrollment station's face engine: the very same detect -> align -> embed pipeline as the doors.

Gallery embeddings must match what the doors compute, so this wraps ``device.vision`` unchanged. The
interpreters are not thread-safe and FastAPI runs handlers on a thread pool, so one lock serialises
inference; the pipeline is built lazily on first use so the API starts without the models.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from core.types import FloatArray, ImageArray
from device.config import DetectorConfig, QualityConfig
from server.config import ServerConfig

logger = logging.getLogger(__name__)

FACES_GATE = "face_count"  # same name as device.vision.quality


class EngineUnavailableError(Exception):
    """The models are not built or do not load."""


@dataclass(frozen=True, slots=True)
class GateFailure:
    """One failed quality gate with the measured value, its limit and a readable reason."""

    gate: str
    measured: float | None
    limit: float | None
    message: str


class QualityRejectedError(Exception):
    """An image failed one or more enrollment gates (including 'exactly one face')."""

    def __init__(self, failures: list[GateFailure]) -> None:
        self.failures = failures
        super().__init__("; ".join(f.message for f in failures))


class FaceCountError(QualityRejectedError):
    """A probe image has zero or several faces."""

    def __init__(self, count: int) -> None:
        what = "no face was found" if count == 0 else f"{count} faces were found"
        super().__init__([GateFailure(FACES_GATE, float(count), 1.0,
                                      f"{what}; the image must show exactly one face")])
        self.count = count


@dataclass(frozen=True, slots=True)
class FaceSample:
    """An enrollable face: its aligned chip, its embedding and the measured quality figures."""

    chip: ImageArray
    vector: FloatArray
    quality: dict[str, float] = field(default_factory=dict)


def _gate_failures(report: Any) -> list[GateFailure]:
    """Convert ``device.vision.quality.QualityReport.failures`` (objects or tuples) to GateFailure."""
    out = []
    for item in report.failures:
        if isinstance(item, tuple):
            gate, measured, limit, message = item
        else:
            gate, measured, limit, message = item.gate, item.measured, item.limit, item.message
        out.append(GateFailure(str(gate), _num(measured), _num(limit), str(message)))
    return out


def _num(value: Any) -> float | None:
    return None if value is None else float(value)


def _report_figures(report: Any) -> dict[str, float]:
    """The measured values a report exposes (``measurements`` mapping when present)."""
    figures = getattr(report, "measurements", None) or getattr(report, "measured", None) or {}
    return {str(k): float(v) for k, v in dict(figures).items() if isinstance(v, int | float)}


class RecognitionEngine:
    """Thread-safe, lazily built face pipeline plus the enrollment quality gates."""

    def __init__(self, models_dir: Path | None, detector: DetectorConfig, quality: QualityConfig,
                 threads: int = 1, embedder: Literal["int8", "float32"] = "int8") -> None:
        self._models_dir = models_dir
        self._detector_cfg = detector
        self._quality_cfg = quality
        self._threads = threads
        self._embedder = embedder
        self._pipeline: Any = None
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def from_config(cls, config: ServerConfig, models_dir: Path | None = None) -> RecognitionEngine:
        """Build from the server config's models, detector and quality sections (``models_dir`` wins)."""
        return cls(models_dir or config.models.dir, config.detector, config.quality, config.models.threads,
                   config.models.embedder)

    def use_models(self, models_dir: Path) -> None:
        """Run the models in ``models_dir`` from the next request on (a promotion or a rollback)."""
        with self._lock:
            pipeline, self._pipeline = self._pipeline, None
            self._models_dir = models_dir
        if pipeline is not None and hasattr(pipeline, "close"):
            pipeline.close()
        logger.info("enrollment pipeline switched to %s", models_dir)

    def _load(self) -> Any:
        if self._pipeline is None:
            if self._closed:
                raise EngineUnavailableError("the recognition engine is closed")
            try:
                from device.vision.pipeline import FacePipeline
                from models.runtime.assets import default_models_dir

                directory = self._models_dir or default_models_dir()
                self._pipeline = FacePipeline.from_models_dir(
                    directory, self._detector_cfg, threads=self._threads, embedder_variant=self._embedder
                )
            except Exception as exc:  # any load failure becomes one clear 503 for the API
                raise EngineUnavailableError(
                    f"face models cannot be loaded ({exc}); run `facegate models build`"
                ) from exc
            logger.info("enrollment pipeline loaded (embedder %s)", self._pipeline.model_sha256[:12])
        return self._pipeline

    @property
    def model_sha256(self) -> str:
        """sha256 of the embedder the templates are computed with."""
        with self._lock:
            return str(self._load().model_sha256)

    def enrollment_sample(self, rgb: ImageArray) -> FaceSample:
        """Run the quality gates and embed the single face; raise QualityRejectedError with every failure."""
        from device.vision.quality import check_enrollment

        with self._lock:
            pipeline = self._load()
            report = check_enrollment(rgb, pipeline, self._quality_cfg)
            if not report.passed:
                raise QualityRejectedError(_gate_failures(report))
            faces = pipeline.analyze(rgb)
        if len(faces) != 1:
            raise FaceCountError(len(faces))
        face = faces[0]
        return FaceSample(chip=face.chip.rgb, vector=_unit(face.embedding.vector),
                          quality=_report_figures(report))

    def probe(self, rgb: ImageArray) -> FloatArray:
        """Embedding of the single face in a verify/identify image; FaceCountError otherwise."""
        with self._lock:
            faces = self._load().analyze(rgb)
        if len(faces) != 1:
            raise FaceCountError(len(faces))
        return _unit(faces[0].embedding.vector)

    def close(self) -> None:
        """Release the interpreters (idempotent)."""
        with self._lock:
            self._closed = True
            pipeline, self._pipeline = self._pipeline, None
        if pipeline is not None and hasattr(pipeline, "close"):
            pipeline.close()


def _unit(vector: Any) -> FloatArray:
    """L2-normalised float32 copy (the doors compare with cosine = dot product)."""
    arr = np.asarray(vector, dtype=np.float32).reshape(-1)
    norm = float(np.linalg.norm(arr))
    return arr / norm if norm > 0 else arr
