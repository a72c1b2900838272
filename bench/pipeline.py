"""Per-stage latency of our face pipeline (int8 and float) against dlib's, one thread, same run.

Each pipeline runs detect -> align -> embed on the same 250x250 face images (CelebA crops when
``../shared`` is there, otherwise faces that scikit-image and matplotlib ship, cropped and resized),
after a warm-up, for at least ``MIN_RUNS`` runs; we report the median per stage and of the per-run
total, and the ratio dlib_total / ours_total. Call ``limit_threads()`` before numpy, OpenCV or dlib
load their thread pools (bench/cli.py does).
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

logger = logging.getLogger(__name__)

MIN_RUNS = 100
WARMUP_RUNS = 5
BENCH_IMAGES = 20  # distinct images cycled through the runs
IMAGE_SIDE = 250
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "DLIB_NUM_THREADS",
              "TF_NUM_INTEROP_THREADS", "TF_NUM_INTRAOP_THREADS")
STAGES = ("detect", "align", "embed")

Image = npt.NDArray[np.uint8]
StageFn = Callable[[Image], dict[str, float]]


def limit_threads() -> None:
    """Pin BLAS/OpenMP pools to one thread (env read at library load) and OpenCV to one thread."""
    for name in THREAD_ENV:
        os.environ[name] = "1"
    import cv2

    cv2.setNumThreads(1)


def celeba_images(shared: Path, count: int = BENCH_IMAGES) -> list[Image]:
    """The first ``count`` images (one per identity) of the shared CelebA crops."""
    from models.face.image import decode_image

    root = shared / "data" / "celeba-faces"
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    out = []
    for folder in folders[:count]:
        first = sorted(folder.glob("*.jpg"))[0]
        out.append(decode_image(first.read_bytes()))
    return out


def packaged_images() -> list[Image]:
    """Face crops (250x250) from astronaut and grace_hopper, mirrored and slightly shifted."""
    import cv2
    import matplotlib
    from skimage import data as skimage_data

    data: Any = skimage_data  # scikit-image's loaders are untyped
    hopper_file = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    bgr = cv2.imread(str(hopper_file))
    if bgr is None:
        raise FileNotFoundError(f"{hopper_file} is missing (matplotlib sample data)")
    hopper = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    crops = [data.astronaut()[40:240, 120:320], hopper[100:400, 110:410]]
    out: list[Image] = []
    for crop in crops:
        for shift in (0, 8, 16):
            piece = crop[shift:, shift:]
            resized = cv2.resize(piece, (IMAGE_SIDE, IMAGE_SIDE), interpolation=cv2.INTER_AREA)
            out.extend([np.ascontiguousarray(resized), np.ascontiguousarray(resized[:, ::-1])])
    return out


class OursStages:
    """Our FacePipeline split into timed stages."""

    def __init__(self, models_dir: Path, variant: str) -> None:
        from device.config import DetectorConfig
        from device.vision.embedder import EmbedderVariant
        from device.vision.pipeline import FacePipeline

        embedder: EmbedderVariant = "int8" if variant == "int8" else "float32"
        self.pipeline = FacePipeline.from_models_dir(models_dir, DetectorConfig(), threads=1,
                                                     embedder_variant=embedder)

    def __call__(self, rgb: Image) -> dict[str, float]:
        """Times (ms) of detect, align, embed on one image (nan stages when no face)."""
        t0 = time.perf_counter()
        dets = self.pipeline.detect(rgb)
        t1 = time.perf_counter()
        if not dets:
            return {"detect": (t1 - t0) * 1000.0}
        chip = self.pipeline.align(rgb, dets[0])
        t2 = time.perf_counter()
        self.pipeline.embed(chip)
        t3 = time.perf_counter()
        return {"detect": (t1 - t0) * 1000.0, "align": (t2 - t1) * 1000.0, "embed": (t3 - t2) * 1000.0}

    def close(self) -> None:
        """Release the interpreters."""
        self.pipeline.close()


class DlibStages:
    """The dlib reference: HOG (upsample 1), shape_predictor_5 + get_face_chip, ResNet descriptor."""

    def __init__(self) -> None:
        import dlib

        from models.runtime.assets import dlib_model_file

        self._dlib = dlib
        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(str(dlib_model_file("shape_predictor_5_face_landmarks.dat")))
        self.resnet = dlib.face_recognition_model_v1(
            str(dlib_model_file("dlib_face_recognition_resnet_model_v1.dat")))

    def __call__(self, rgb: Image) -> dict[str, float]:
        """Times (ms) of detect, align, embed on one image."""
        t0 = time.perf_counter()
        rects = self.detector(rgb, 1)
        t1 = time.perf_counter()
        if not len(rects):
            return {"detect": (t1 - t0) * 1000.0}
        shape = self.predictor(rgb, rects[0])
        chip = self._dlib.get_face_chip(rgb, shape, 150, 0.25)
        t2 = time.perf_counter()
        self.resnet.compute_face_descriptor(chip)
        t3 = time.perf_counter()
        return {"detect": (t1 - t0) * 1000.0, "align": (t2 - t1) * 1000.0, "embed": (t3 - t2) * 1000.0}

    def close(self) -> None:
        """Nothing to release."""


@dataclass(frozen=True, slots=True)
class StageTimes:
    """Median milliseconds per stage and of the per-run total, over the runs where a face was found."""

    detect: float
    align: float
    embed: float
    total: float
    runs: int
    misses: int

    def as_dict(self) -> dict[str, float | int]:
        """JSON-ready dict."""
        return {"detect": round(self.detect, 3), "align": round(self.align, 3), "embed": round(self.embed, 3),
                "total": round(self.total, 3), "runs": self.runs, "misses": self.misses}


def measure(stages: StageFn, images: list[Image], runs: int, warmup: int = WARMUP_RUNS) -> StageTimes:
    """Run ``stages`` over the images cyclically; medians over the complete runs."""
    for i in range(warmup):
        stages(images[i % len(images)])
    complete: list[dict[str, float]] = []
    misses = 0
    for i in range(runs):
        times = stages(images[i % len(images)])
        if len(times) == len(STAGES):
            complete.append(times)
        else:
            misses += 1
    if not complete:
        raise ValueError("no face was found in any benchmark image")
    med = {s: statistics.median(t[s] for t in complete) for s in STAGES}
    total = statistics.median(sum(t.values()) for t in complete)
    return StageTimes(med["detect"], med["align"], med["embed"], total, len(complete), misses)


def run_bench(models_dir: Path, shared: Path | None, runs: int = MIN_RUNS,
              pipelines: tuple[str, ...] = ("int8", "float", "dlib")) -> dict[str, Any]:
    """Benchmark the pipelines on the same images; return JSON-ready figures and ratios."""
    if runs < 1:
        raise ValueError("runs must be >= 1")
    if shared is not None and (shared / "data" / "celeba-faces").is_dir():
        images, source = celeba_images(shared), "celeba-faces"
    else:
        images, source = packaged_images(), "packaged (scikit-image astronaut, matplotlib grace_hopper)"
    factories: dict[str, Callable[[], Any]] = {
        "int8": lambda: OursStages(models_dir, "int8"),
        "float": lambda: OursStages(models_dir, "float32"),
        "dlib": DlibStages,
    }
    results: dict[str, StageTimes] = {}
    for name in pipelines:
        stages = factories[name]()
        try:
            logger.info("benchmarking %s (%d runs)", name, runs)
            results[name] = measure(stages, images, runs)
        finally:
            stages.close()
    out: dict[str, Any] = {"threads": 1, "runs": runs, "images": len(images), "source": source,
                           "pipelines": {k: v.as_dict() for k, v in results.items()}}
    if "dlib" in results:
        out["ratio_dlib_over_ours"] = {k: round(results["dlib"].total / v.total, 2)
                                       for k, v in results.items() if k != "dlib"}
    return out
