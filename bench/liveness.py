"""`facegate bench liveness`: per-frame cost of the liveness stage, one thread, as a share of the pipeline.

Measured in the same run on the same frames (NUAA 640x480 webcam frames when ``../shared`` is there,
otherwise packaged scikit-image / matplotlib faces):

- the pipeline baseline: detect (BlazeFace short), align and embed (``FacePipeline`` from the built models
  when they exist; otherwise detect alone, and the JSON says so);
- the liveness stages: ``passive`` (two MiniFASNets, each on the patch and its mirror, and the head; the
  same without the mirror pass is reported as ``passive_without_mirror_ms``), ``mesh`` (face mesh +
  EAR/yaw/pitch, what the
  challenge and planar checks need), ``planar`` (one homography + similarity fit on the mesh subset).

Share = liveness ms / (pipeline ms + liveness ms), for passive only and for all three checks.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import numpy as np
import numpy.typing as npt

logger = logging.getLogger(__name__)

MIN_RUNS = 50
WARMUP_RUNS = 5
BENCH_FRAMES = 20  # distinct frames cycled through the runs
NUAA_LABELS = Path("data") / "liveness-nuaa" / "labels.csv"
REPO_PARENT = Path(__file__).resolve().parents[2]
DEFAULT_SHARED = Path(os.environ.get("FACEGATE_SHARED", REPO_PARENT / "shared"))

Image = npt.NDArray[np.uint8]


def nuaa_frames(shared: Path, count: int = BENCH_FRAMES) -> list[Image]:
    """Every n-th genuine NUAA frame (640x480), up to ``count``."""
    import csv

    from models.face.image import decode_image

    labels = shared / NUAA_LABELS
    with open(labels, newline="", encoding="utf-8") as handle:
        paths = [row["path"] for row in csv.DictReader(handle) if row["label"] == "genuine"]
    step = max(len(paths) // count, 1)
    return [decode_image((labels.parent / p).read_bytes()) for p in paths[::step][:count]]


def _median_ms(fn: Callable[[Any], object], items: list[Any], runs: int) -> float:
    for i in range(WARMUP_RUNS):
        fn(items[i % len(items)])
    times = []
    for i in range(runs):
        start = time.perf_counter()
        fn(items[i % len(items)])
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def run_liveness_bench(models_dir: Path, minifasnet_dir: Path | None, shared: Path | None,
                       runs: int = MIN_RUNS) -> dict[str, Any]:
    """Median ms per frame of the pipeline stages and the liveness checks; shares of the total."""
    from bench.pipeline import packaged_images
    from device.config import DetectorConfig, LivenessConfig
    from device.liveness.passive import PassiveLiveness, crop_patch, face_box, resolve_minifasnet_files
    from device.liveness.planar import PLANAR_MESH_INDICES, frame_fit
    from device.liveness.trained import TrainedHead, trained_head_files
    from models.face.detector import BlazeFaceDetector
    from models.face.mesh import MeshMeasurer, mesh_model_path
    from models.runtime.interpreter import ModelLoadError
    from models.runtime.manifest import ManifestError
    from server.evaluation.liveness import detector_path

    if shared is not None and (shared / NUAA_LABELS).is_file():
        frames, source = nuaa_frames(shared), "liveness-nuaa genuine frames (640x480)"
    else:
        frames, source = packaged_images(), "packaged (scikit-image astronaut, matplotlib grace_hopper)"
    manifest = models_dir / "manifest.json"
    out: dict[str, Any] = {"threads": 1, "runs": runs, "frames": len(frames), "source": source}
    with BlazeFaceDetector(detector_path(models_dir if manifest.is_file() else None, "short"), "short",
                           DetectorConfig()) as detector:
        dets = [detector.detect(f) for f in frames]
        pairs = [(f, d[0]) for f, d in zip(frames, dets, strict=True) if d]
        if not pairs:
            raise ValueError("no face was found in any benchmark frame")
        stages: dict[str, float] = {"detect": _median_ms(detector.detect, frames, runs)}
    pipeline_note = "detect only: no built models (run `facegate models build`)"
    if manifest.is_file():
        from device.vision.pipeline import FacePipeline

        try:
            with FacePipeline.from_models_dir(models_dir, DetectorConfig(), threads=1) as pipe:
                chips = [pipe.align(f, d) for f, d in pairs]
                stages["align"] = _median_ms(lambda fd: pipe.align(fd[0], fd[1]), pairs, runs)
                stages["embed"] = _median_ms(pipe.embed, chips, runs)
                pipeline_note = "detect + align + embed (int8) from the built models"
        except (ManifestError, ModelLoadError, OSError, ValueError) as exc:  # partial build: say why
            logger.warning("pipeline models unavailable (%s); baseline is detect only", exc)
    with PassiveLiveness(resolve_minifasnet_files(models_dir, minifasnet_dir),
                         head=LivenessConfig().passive.head) as passive:
        live = {"passive": _median_ms(lambda fd: passive.score(fd[0], fd[1]), pairs, runs)}

        def one_pass(fd: tuple[Any, Any]) -> None:
            bgr = np.ascontiguousarray(fd[0][:, :, ::-1])
            for spec, model in passive.models:
                model.run(crop_patch(bgr, face_box(fd[1]), spec.scale)[None])

        without_mirror = _median_ms(one_pass, pairs, runs)
    trained_ms = None
    trained = trained_head_files(models_dir) if manifest.is_file() else None
    if trained is not None:  # a models folder with a promoted fine-tuned head: its passive score instead
        with TrainedHead(*trained) as head:
            trained_ms = _median_ms(lambda fd: head.score(fd[0], fd[1]), pairs, runs)
    with MeshMeasurer(mesh_model_path(models_dir if manifest.is_file() else None, "facemesh")) as mesh:
        live["mesh"] = _median_ms(lambda fd: mesh.observe(fd[0], fd[1]), pairs, runs)
        observed = [mesh.observe(f, d) for f, d in pairs]
    subsets = [o[0].points[list(PLANAR_MESH_INDICES), :2] for o in observed if o is not None]
    planar_pairs = [(subsets[0], s) for s in subsets[1:]] or [(subsets[0], subsets[0])]
    live["planar"] = _median_ms(lambda ab: frame_fit(ab[0], ab[1]), planar_pairs, runs)
    base = sum(stages.values())
    all_live = sum(live.values())
    out.update({
        "pipeline": pipeline_note,
        "pipeline_ms": {k: round(v, 3) for k, v in stages.items()},
        "liveness_ms": {k: round(v, 3) for k, v in live.items()},
        "pipeline_total_ms": round(base, 3),
        "share_passive": round(live["passive"] / (base + live["passive"]), 4),
        "share_all_checks": round(all_live / (base + all_live), 4),
        "ratio_passive_over_pipeline": round(live["passive"] / base, 3),
        "passive_without_mirror_ms": round(without_mirror, 3),
        "passive_trained_ms": None if trained_ms is None else round(trained_ms, 3),
        "ratio_trained_over_passive": None if trained_ms is None else round(trained_ms / live["passive"], 3),
    })
    return out


@click.command("liveness")
@click.option("--models-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Built models folder (default: the `facegate models build` cache).")
@click.option("--minifasnet", "minifasnet_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, envvar="FACEGATE_MINIFASNET_DIR",
              help="MiniFASNet .tflite folder when not in the manifest.")
@click.option("--shared", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_SHARED,
              show_default=True, help="Shared data folder (NUAA frames); packaged faces when absent.")
@click.option("--runs", type=click.IntRange(min=MIN_RUNS), default=MIN_RUNS, show_default=True,
              help="Timed runs per stage (medians are reported).")
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object on stdout.")
def liveness(models_dir: Path | None, minifasnet_dir: Path | None, shared: Path, runs: int,
             as_json: bool) -> None:
    """Median ms per frame of the liveness checks vs detect/align/embed, one thread."""
    from bench.pipeline import limit_threads

    limit_threads()
    from device.liveness.passive import PassiveModelError
    from models.face.mesh import MeshUnavailableError
    from models.runtime.assets import default_models_dir
    from models.runtime.manifest import ManifestError

    try:
        result = run_liveness_bench(models_dir or default_models_dir(), minifasnet_dir,
                                    shared if shared.is_dir() else None, runs)
    except (PassiveModelError, MeshUnavailableError, ManifestError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"{result['runs']} runs on {result['frames']} frames ({result['source']}), one thread; "
               "median ms")
    click.echo(f"pipeline ({result['pipeline']}): {result['pipeline_ms']} = {result['pipeline_total_ms']} ms")
    click.echo(f"liveness: {result['liveness_ms']} (passive without the mirror pass: "
               f"{result['passive_without_mirror_ms']} ms)")
    click.echo(f"share of the frame: passive {result['share_passive']:.1%}, all three checks "
               f"{result['share_all_checks']:.1%}; passive / pipeline = "
               f"{result['ratio_passive_over_pipeline']}x")
