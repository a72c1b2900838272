"""The pairs verification protocol: embed each image once, score every pair, report ROC figures.

Pipelines (registry ``PIPELINES``):

- ``dlib``: the reference users would pick instead, as ``face_recognition`` runs it: dlib's HOG
  detector (upsampled once), ``shape_predictor_5`` and dlib's ResNet on the 150x150 chip (dlib-bin).
- ``float`` / ``int8``: our ``FacePipeline`` (BlazeFace, face-mesh alignment, TFLite embedder).

Both take the largest face of an image (the pairs' images are face crops) and score a pair by the
cosine of the L2-normalised descriptors. An image without a face makes every pair it is in a failure
(score -inf, never accepted): it is counted, not skipped.

Pooled figures (AUC, EER, TAR at FAR) are over every pair. ``tenfold`` is the standard protocol: for
each fold, the threshold is chosen on the other folds (best accuracy; and the threshold of each FAR)
and applied to that fold; the JSON gives the mean and sd over folds (null with a single fold).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from device.config import DetectorConfig
from models.face.image import ImageError, decode_image
from server.evaluation.metrics import tenfold_report, verification_report

logger = logging.getLogger(__name__)

HOG_UPSAMPLE = 1  # face_recognition's default number_of_times_to_upsample
CHIP_SIZE = 150
CHIP_PADDING = 0.25  # dlib's default, what compute_face_descriptor uses


class PairsError(Exception):
    """The pairs file is missing or malformed."""


@dataclass(frozen=True, slots=True)
class PairRow:
    """One row of the pairs protocol (paths relative to the CSV)."""

    fold: int
    path_a: str
    path_b: str
    same: int


def read_pairs(path: Path, folds: frozenset[int] | None = None) -> list[PairRow]:
    """Rows of a pairs CSV (fold, path_a, path_b, same), optionally only some folds."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = [PairRow(int(r["fold"]), r["path_a"], r["path_b"], int(r["same"]))
                    for r in csv.DictReader(handle)]
    except FileNotFoundError as exc:
        raise PairsError(f"pairs file {path} does not exist") from exc
    except (KeyError, ValueError, TypeError) as exc:
        raise PairsError(f"{path} must have columns fold,path_a,path_b,same with integer fold/same: {exc}") \
            from exc
    if not rows:
        raise PairsError(f"{path} lists no pairs")
    return [r for r in rows if folds is None or r.fold in folds]


Vector = npt.NDArray[np.float32]


class ImageEmbedder(Protocol):
    """Turns an image file into a unit descriptor, or None when no face is found."""

    @property
    def ident(self) -> str:
        """What produces the descriptors (models, detector, alignment): the embedding cache's key."""

    def embed_file(self, path: Path) -> Vector | None:
        """Descriptor of the largest face in the image file."""

    def close(self) -> None:
        """Release models."""


def _unit(vec: npt.ArrayLike) -> Vector:
    arr = np.asarray(vec, np.float32).reshape(-1)
    return arr / max(float(np.linalg.norm(arr)), 1e-12)


def _read(path: Path) -> npt.NDArray[np.uint8] | None:
    """Validated RGB image, or None (logged) when the file is unreadable."""
    try:
        return decode_image(path.read_bytes())
    except (OSError, ImageError) as exc:
        logger.warning("cannot read %s: %s", path.name, exc)
        return None


class DlibReference:
    """dlib HOG + shape_predictor_5 + ResNet, the way face_recognition runs them."""

    def __init__(self) -> None:
        try:
            import dlib
        except ImportError as exc:
            raise PairsError("the dlib reference needs dlib-bin: pip install dlib-bin") from exc
        from models.runtime.assets import dlib_model_file

        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(str(dlib_model_file("shape_predictor_5_face_landmarks.dat")))
        self._resnet = dlib.face_recognition_model_v1(
            str(dlib_model_file("dlib_face_recognition_resnet_model_v1.dat")))
        self._ident = f"dlib-{dlib.__version__}-hog{HOG_UPSAMPLE}-sp5-chip{CHIP_SIZE}"

    @property
    def ident(self) -> str:
        """dlib's version and the way it is run."""
        return self._ident

    def embed_file(self, path: Path) -> Vector | None:
        """Descriptor of the largest HOG face."""
        rgb = _read(path)
        if rgb is None:
            return None
        rects = self._detector(rgb, HOG_UPSAMPLE)
        if not len(rects):
            return None
        rect = max(rects, key=lambda r: r.width() * r.height())
        shape = self._predictor(rgb, rect)
        return _unit(self._resnet.compute_face_descriptor(rgb, shape))

    def close(self) -> None:
        """Nothing to release (dlib objects are freed with the instance)."""


class PipelineEmbedder:
    """Our FacePipeline with the float32 or int8 embedder."""

    def __init__(self, variant: str, models_dir: Path | None = None, threads: int = 1,
                 detector_cfg: DetectorConfig | None = None, align_method: str | None = None,
                 flip_fusion: bool | None = None) -> None:
        from device.vision.embedder import FLIP_FUSION
        from device.vision.pipeline import FacePipeline
        from models.face.align import DEFAULT_METHOD, AlignMethod
        from models.runtime.assets import default_models_dir

        directory = models_dir if models_dir is not None else default_models_dir()
        detector = detector_cfg if detector_cfg is not None else DetectorConfig()
        self._pipeline = FacePipeline.from_models_dir(
            directory, detector, threads=threads, embedder_variant="int8" if variant == "int8" else "float32",
            align_method=AlignMethod(align_method) if align_method else DEFAULT_METHOD,
            flip_fusion=FLIP_FUSION if flip_fusion is None else flip_fusion)
        self._ident = f"{self._pipeline.ident}|{detector.model_dump_json()}"

    @property
    def ident(self) -> str:
        """The pipeline's models, alignment, flip fusion and detector settings."""
        return self._ident

    def embed_file(self, path: Path) -> Vector | None:
        """Descriptor of the largest BlazeFace face."""
        rgb = _read(path)
        if rgb is None:
            return None
        chip = self._pipeline.largest_chip(rgb)
        return None if chip is None else self._pipeline.embed(chip).vector

    def close(self) -> None:
        """Release the interpreters."""
        self._pipeline.close()


PIPELINES: dict[str, Callable[..., ImageEmbedder]] = {
    "dlib": lambda models_dir=None, threads=1: DlibReference(),
    "float": lambda models_dir=None, threads=1: PipelineEmbedder("float32", models_dir, threads),
    "int8": lambda models_dir=None, threads=1: PipelineEmbedder("int8", models_dir, threads),
}


def pair_scores(pairs: list[PairRow], vectors: dict[str, Vector | None]) -> npt.NDArray[np.float64]:
    """Cosine per pair; -inf when either image has no face."""
    scores = np.full(len(pairs), -np.inf)
    for i, row in enumerate(pairs):
        a, b = vectors.get(row.path_a), vectors.get(row.path_b)
        if a is not None and b is not None:
            scores[i] = float(a @ b)
    return scores


def embed_pairs(pairs_csv: Path, pairs: list[PairRow], pipeline: str, models_dir: Path | None,
                progress: bool) -> tuple[list[str], dict[str, Vector | None]]:
    """Every image the pairs name, embedded once by ``pipeline`` (None where no face was found; cached)."""
    from server.evaluation.embed_cache import cached_embed_all

    paths = sorted({p for row in pairs for p in (row.path_a, row.path_b)})
    embedder = PIPELINES[pipeline](models_dir=models_dir)
    try:
        return paths, cached_embed_all(embedder, pairs_csv.parent, paths, progress)
    finally:
        embedder.close()


def run_verify(pairs_csv: Path, pipeline: str, models_dir: Path | None = None,
               folds: frozenset[int] | None = None, progress: bool = True) -> dict[str, Any]:
    """The whole protocol for one pipeline; returns the JSON-ready result of `eval verify`."""
    if pipeline not in PIPELINES:
        raise PairsError(f"unknown pipeline '{pipeline}' (known: {sorted(PIPELINES)})")
    pairs = read_pairs(pairs_csv, folds)
    if not pairs:
        raise PairsError(f"no pairs in {pairs_csv} for folds {sorted(folds or [])}")
    paths, vectors = embed_pairs(pairs_csv, pairs, pipeline, models_dir, progress)
    scores = pair_scores(pairs, vectors)
    labels = np.array([row.same for row in pairs])
    report = verification_report(scores, labels)
    tenfold = tenfold_report(scores, labels, np.array([row.fold for row in pairs]))
    missing = sum(v is None for v in vectors.values())
    logger.info("%s: %d pairs, %d images, %d without a face", pipeline, len(pairs), len(paths), missing)
    return {"pipeline": pipeline, **report.as_dict(), "fail_to_detect": missing, "tenfold": tenfold}
