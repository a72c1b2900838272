"""`facegate bench frame`: the agent's per-frame processing with challenge liveness on, one thread.

Measured in the same run on the same frames (NUAA 640x480 webcam frames when ``../shared`` is there,
otherwise packaged scikit-image / matplotlib faces):

- ``plain``: what the door does per frame without liveness: detect -> align -> embed every face;
- ``challenge``: the same frame as the agent's ``FramePipeline`` processes it with the active challenge on
  every face (``challenge = "always"``, passive on as configured): passive + the challenge state machine on
  one track, reusing the face mesh the alignment ran (``FaceResult.mesh``).

- ``challenge_mesh_twice``: the same, with liveness running its own face mesh again (how the agent did it
  before ``FramePipeline`` carried the mesh): the before/after of issue 19 in one run.

Reported: median ms per frame of each and the ratios to plain.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from bench.liveness import DEFAULT_SHARED

MIN_RUNS = 50
WARMUP_RUNS = 5
TRACK_ID = 1  # one person held in front of the door: the challenge stays pending, the mesh runs each frame


def _median_ms(fn: Callable[[Any, float], object], items: list[Any], runs: int) -> float:
    for i in range(WARMUP_RUNS):
        fn(items[i % len(items)], float(i))
    times = []
    for i in range(runs):
        start = time.perf_counter()
        fn(items[i % len(items)], float(WARMUP_RUNS + i) * 0.01)
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def run_frame_bench(models_dir: Path, shared: Path | None, runs: int = MIN_RUNS) -> dict[str, Any]:
    """Median ms per frame of the plain pipeline and of the agent's processing with challenge liveness."""
    from bench.liveness import NUAA_LABELS, nuaa_frames
    from bench.pipeline import packaged_images
    from device.config import ChallengeLivenessConfig, LivenessConfig
    from device.liveness.fusion import FusedLiveness, build_liveness
    from device.vision.pipeline import FacePipeline

    if shared is not None and (shared / NUAA_LABELS).is_file():
        frames, source = nuaa_frames(shared), "nuaa genuine frames"
    else:
        frames, source = packaged_images(), "packaged (scikit-image astronaut, matplotlib grace_hopper)"
    config = LivenessConfig(challenge=ChallengeLivenessConfig(mode="always"))
    pipeline = FacePipeline.from_models_dir(models_dir, threads=1)
    liveness = build_liveness(config, models_dir, threads=1)
    if not isinstance(liveness, FusedLiveness):
        pipeline.close()
        raise ValueError("challenge liveness did not build a FusedLiveness engine")
    try:
        def plain(rgb: Any, _: float) -> object:
            return pipeline.analyze(rgb)

        def challenge(rgb: Any, timestamp: float) -> object:
            faces = pipeline.analyze(rgb)
            return [liveness.assess(rgb, f.detection, TRACK_ID, timestamp, mesh=f.mesh) for f in faces]

        def mesh_twice(rgb: Any, timestamp: float) -> object:
            faces = pipeline.analyze(rgb)
            return [liveness.assess(rgb, f.detection, TRACK_ID + 1, timestamp) for f in faces]

        plain_ms = _median_ms(plain, frames, runs)
        challenge_ms = _median_ms(challenge, frames, runs)
        twice_ms = _median_ms(mesh_twice, frames, runs)
    finally:
        liveness.close()
        pipeline.close()
    return {"threads": 1, "runs": runs, "frames": len(frames), "source": source,
            "plain_ms": round(plain_ms, 3), "challenge_ms": round(challenge_ms, 3),
            "ratio_challenge_over_plain": round(challenge_ms / plain_ms, 3),
            "challenge_mesh_twice_ms": round(twice_ms, 3),
            "ratio_mesh_twice_over_plain": round(twice_ms / plain_ms, 3)}


@click.command("frame")
@click.option("--models-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Built models folder (default: the `facegate models build` cache).")
@click.option("--shared", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_SHARED,
              show_default=True, help="Shared data folder (NUAA frames); packaged faces when absent.")
@click.option("--runs", type=click.IntRange(min=1), default=MIN_RUNS, show_default=True,
              help="Timed runs per variant (medians are reported).")
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object on stdout.")
def frame(models_dir: Path | None, shared: Path, runs: int, as_json: bool) -> None:
    """Median ms per frame: the agent's processing with challenge liveness vs the plain pipeline."""
    from bench.pipeline import limit_threads

    limit_threads()
    from device.liveness.passive import PassiveModelError
    from models.runtime.assets import default_models_dir
    from models.runtime.manifest import ManifestError

    try:
        folder = models_dir or default_models_dir()
        result = run_frame_bench(folder, shared if shared.is_dir() else None, runs)
    except (PassiveModelError, ManifestError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"{result['runs']} runs on {result['frames']} frames ({result['source']}), one thread; "
               f"median ms per frame: plain {result['plain_ms']}, with challenge liveness "
               f"{result['challenge_ms']} (x{result['ratio_challenge_over_plain']}), with the mesh run twice "
               f"{result['challenge_mesh_twice_ms']} (x{result['ratio_mesh_twice_over_plain']})")
