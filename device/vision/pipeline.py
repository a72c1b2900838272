"""detect -> align -> embed: the one face pipeline shared by the doors and the enrollment server.

``FacePipeline.from_models_dir`` loads every model from a built models folder (``manifest.json``),
checking each file's sha256. The enrollment station runs this very class, so gallery templates and
door probes are computed identically. API contract (used by device.agent and server): ``detect``,
``align``, ``embed``, ``analyze``, ``model_sha256``, ``model_version``; a context manager.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from core.types import Chip, Detection, Embedding, ImageArray
from device.config import DetectorConfig
from device.vision.embedder import FLIP_FUSION, Embedder, EmbedderVariant
from models.face.align import (
    DEFAULT_METHOD,
    KEYPOINT_TEMPLATE,
    MESH_TEMPLATE,
    AlignMethod,
    align_keypoints,
    align_points,
)
from models.face.detector import SPECS, BlazeFaceDetector
from models.face.image import as_rgb
from models.face.mesh import FaceMesh, MeshResult
from models.runtime.assets import default_models_dir
from models.runtime.manifest import ManifestError, load_manifest, verify_entry

logger = logging.getLogger(__name__)

MESH_ENTRY = "facemesh"
# A frame rarely holds more faces than this at a door; the rest (smallest scores) are ignored so that
# a crowd cannot make one frame take seconds.
MAX_FACES_PER_FRAME = 8
# Below this face-presence probability the mesh is not trusted and BlazeFace keypoints align instead.
MIN_MESH_PRESENCE = 0.5


@dataclass(frozen=True, slots=True)
class FaceResult:
    """One analysed face: detection, chip, embedding, per-stage latencies (ms) and the face mesh the
    alignment ran (None without one): liveness reuses it, so the mesh runs once per face."""

    detection: Detection
    chip: Chip
    embedding: Embedding
    latencies_ms: dict[str, float] = field(default_factory=dict)
    mesh: MeshResult | None = None


class FacePipeline:
    """Detector + aligner + embedder; ``close()`` is idempotent."""

    def __init__(self, detector: BlazeFaceDetector, embedder: Embedder, mesh: FaceMesh | None = None,
                 align_method: AlignMethod = DEFAULT_METHOD) -> None:
        if align_method is AlignMethod.MESH and mesh is None:
            raise ValueError("mesh alignment needs the face-mesh model")
        self.detector = detector
        self.embedder = embedder
        self.mesh = mesh
        self.align_method = align_method
        self._closed = False

    @classmethod
    def from_models_dir(cls, models_dir: Path, detector_cfg: DetectorConfig | None = None, threads: int = 1,
                        embedder_variant: EmbedderVariant = "int8",
                        align_method: AlignMethod = DEFAULT_METHOD,
                        flip_fusion: bool = FLIP_FUSION) -> FacePipeline:
        """Load detector, face mesh and embedder from ``models_dir/manifest.json`` (sha256-checked)."""
        cfg = detector_cfg if detector_cfg is not None else DetectorConfig()
        manifest = load_manifest(models_dir)
        detector_path = verify_entry(models_dir, manifest.get(SPECS[cfg.variant].manifest_name))
        mesh_path = None
        if manifest.has(MESH_ENTRY):
            mesh_path = verify_entry(models_dir, manifest.get(MESH_ENTRY))
        elif align_method is AlignMethod.MESH:
            raise ManifestError(f"'{MESH_ENTRY}' is not in {models_dir}/manifest.json but mesh alignment "
                                "needs it: rebuild with `facegate models build`")
        detector = BlazeFaceDetector(detector_path, cfg.variant, cfg, threads)
        try:
            mesh = FaceMesh(mesh_path, threads) if mesh_path is not None else None
            embedder = Embedder.from_models_dir(models_dir, embedder_variant, threads, flip_fusion)
        except BaseException:
            detector.close()
            raise
        return cls(detector, embedder, mesh, align_method)

    @classmethod
    def default(cls, detector_cfg: DetectorConfig | None = None, threads: int = 1,
                embedder_variant: EmbedderVariant = "int8") -> FacePipeline:
        """The pipeline from the default built-models folder (``facegate models build``)."""
        return cls.from_models_dir(default_models_dir(), detector_cfg, threads, embedder_variant)

    @property
    def model_sha256(self) -> str:
        """sha256 of the embedder: galleries are valid only for this exact model."""
        return self.embedder.sha256

    @property
    def model_version(self) -> str:
        """Version string of the embedder from the manifest."""
        return self.embedder.version

    @property
    def ident(self) -> str:
        """Short identity of what produces the chips and embeddings (for caches and logs)."""
        flip = "+flip" if self.embedder.flip_fusion else ""
        return f"{self.detector.spec.manifest_name}+{self.align_method.value}+{self.model_sha256[:12]}{flip}"

    def detect(self, rgb: ImageArray) -> list[Detection]:
        """Faces in the image, best score first (at most MAX_FACES_PER_FRAME)."""
        return self.detector.detect(rgb)[:MAX_FACES_PER_FRAME]

    def landmarks(self, rgb: ImageArray, det: Detection) -> MeshResult | None:
        """Face-mesh landmarks for a detection, or None when the mesh model is not loaded."""
        if self.mesh is None:
            return None
        return self.mesh.landmarks(as_rgb(rgb), det)

    def align(self, rgb: ImageArray, det: Detection, mesh: MeshResult | None = None) -> Chip:
        """Cut the 150x150 chip for a detection (reuses ``mesh`` when the caller already ran it)."""
        image = as_rgb(rgb)
        if self.align_method is AlignMethod.MESH:
            result = mesh if mesh is not None else self.landmarks(image, det)
            if result is not None and result.presence >= MIN_MESH_PRESENCE:
                return align_points(image, det, result.xy(*MESH_TEMPLATE.indices), MESH_TEMPLATE)
        return align_keypoints(image, det, KEYPOINT_TEMPLATE)

    def embed(self, chip: Chip) -> Embedding:
        """The chip's L2-normalised embedding."""
        return self.embedder.embed(chip)

    def analyze(self, rgb: ImageArray) -> list[FaceResult]:
        """detect -> align -> embed every face; latencies per face ('detect' is shared by the frame)."""
        image = as_rgb(rgb)
        start = time.perf_counter()
        detections = self.detect(image)
        detect_ms = (time.perf_counter() - start) * 1000.0
        results = []
        for det in detections:
            t0 = time.perf_counter()
            mesh = self.landmarks(image, det) if self.align_method is AlignMethod.MESH else None
            chip = self.align(image, det, mesh)
            t1 = time.perf_counter()
            embedding = self.embed(chip)
            t2 = time.perf_counter()
            latencies = {"detect": detect_ms, "align": (t1 - t0) * 1000.0, "embed": (t2 - t1) * 1000.0}
            results.append(FaceResult(det, chip, embedding, latencies, mesh))
        return results

    def largest_chip(self, rgb: ImageArray) -> Chip | None:
        """The chip of the largest detected face, or None when there is no face."""
        image = as_rgb(rgb)
        detections = self.detect(image)
        if not detections:
            return None
        biggest = max(detections, key=lambda d: d.width * d.height)
        return self.align(image, biggest)

    def close(self) -> None:
        """Release every interpreter (safe to call twice)."""
        if self._closed:
            return
        self._closed = True
        self.detector.close()
        self.embedder.close()
        if self.mesh is not None:
            self.mesh.close()

    def __enter__(self) -> FacePipeline:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
