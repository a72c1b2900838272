"""Seconds per style-transfer iteration at 256 px: SqueezeNet (the product's) vs VGG19 (the paper's).

VGG19 runs with random weights (timing only: no weights ship here). SqueezeNet uses the real weights
from ../shared when present, else random ones (the timing is the same). The projected job time is
setup (graph tracing, targets) + 200 x seconds/iteration, against the 60 s goal on 2 cores.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import click

logger = logging.getLogger(__name__)

REPO_PARENT = Path(__file__).resolve().parents[2]
SQUEEZENET_H5 = Path("models/squeezenet/squeezenet_weights_tf_dim_ordering_tf_kernels_notop.h5")
SIZE_PX = 256
# Timed iterations: enough for a stable mean on SqueezeNet; VGG19 is ~10x slower, so fewer.
SQUEEZENET_ITERS = 30
VGG19_ITERS = 4
# Iterations of a warm-up run that traces the graph at this size before timing.
WARMUP_ITERS = 2
JOB_ITERS = 200
GOAL_S = 60.0


def _default_shared() -> Path:
    return Path(os.environ.get("FACEGATE_SHARED", REPO_PARENT / "shared"))


def _time_backbone(name: str, weights: Path | None, iters: int, size: int) -> dict[str, Any]:
    """Setup seconds (first run: build + trace) and loop seconds/iteration of an L-BFGS run."""
    from server.style.backbones import make_backbone
    from server.style.images import resize_longest
    from server.style.params import StyleParams
    from server.style.samples import astronaut, mosaic
    from server.style.transfer import StyleTransfer

    content = resize_longest(astronaut(), size)
    style = mosaic(size)
    started = time.perf_counter()
    transfer = StyleTransfer(make_backbone(name, weights, random_weights=weights is None))
    warm = transfer.run(content, style, StyleParams(size=size, iters=WARMUP_ITERS))
    setup_s = time.perf_counter() - started - (warm.history[-1].elapsed_s if warm.history else 0.0)
    timed_start = time.perf_counter()
    result = transfer.run(content, style, StyleParams(size=size, iters=iters))
    wall = time.perf_counter() - timed_start
    loop_s = result.history[-1].elapsed_s if result.history else wall
    per_iter = loop_s / max(result.iterations, 1)
    return {
        "backbone": name,
        "weights": "real" if weights is not None else "random",
        "iterations": result.iterations,
        "s_per_iter": round(per_iter, 4),
        "setup_s": round(setup_s, 2),
        "per_run_overhead_s": round(wall - loop_s, 3),
    }


def measure(shared: Path | None = None, size: int = SIZE_PX) -> dict[str, Any]:
    """Time both backbones at ``size`` px and project a 200-iteration SqueezeNet job."""
    import tensorflow as tf

    shared = shared if shared is not None else _default_shared()
    weights = shared / SQUEEZENET_H5
    squeeze = _time_backbone("squeezenet", weights if weights.is_file() else None, SQUEEZENET_ITERS, size)
    vgg = _time_backbone("vgg19", None, VGG19_ITERS, size)
    projected = squeeze["setup_s"] + squeeze["per_run_overhead_s"] + JOB_ITERS * squeeze["s_per_iter"]
    return {
        "bench": "style",
        "size_px": size,
        "optimizer": "lbfgs",
        "cpus": os.cpu_count(),
        "tf_intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "squeezenet": squeeze,
        "vgg19": vgg,
        "vgg19_over_squeezenet": round(vgg["s_per_iter"] / squeeze["s_per_iter"], 2),
        "projected_job_s": round(projected, 1),
        "job_iters": JOB_ITERS,
        "goal_s": GOAL_S,
        "meets_goal": bool(projected <= GOAL_S),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def run(json_out: bool = False, shared: Path | None = None, size: int = SIZE_PX) -> dict[str, Any]:
    """Measure and print: exactly one JSON object on stdout when ``json_out``, else a short table."""
    result = measure(shared, size)
    if json_out:
        print(json.dumps(result))
        return result
    sq, vgg = result["squeezenet"], result["vgg19"]
    print(f"style transfer, {size} px, L-BFGS, {result['cpus']} CPUs (load {result['load_avg_1m']})")
    print(f"{'backbone':<11}{'weights':>8}{'s/iter':>9}{'setup s':>9}{'ratio':>7}")
    for row in (sq, vgg):
        ratio = row["s_per_iter"] / sq["s_per_iter"]
        print(f"{row['backbone']:<11}{row['weights']:>8}{row['s_per_iter']:>9.3f}{row['setup_s']:>9.1f}"
              f"{ratio:>6.1f}x")
    verdict = "meets" if result["meets_goal"] else "misses"
    print(f"projected {JOB_ITERS}-iteration squeezenet job: {result['projected_job_s']:.1f} s "
          f"({verdict} the {GOAL_S:.0f} s goal)")
    return result


@click.command("style")
@click.option("--json", "json_out", is_flag=True, help="Print one JSON object instead of the table.")
@click.option("--size", type=click.IntRange(32, 1024), default=SIZE_PX, show_default=True,
              help="Longest side of the generated image.")
@click.option("--shared", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="The ../shared folder (SqueezeNet weights); default $FACEGATE_SHARED or ../shared.")
def style(json_out: bool, size: int, shared: Path | None) -> None:
    """Seconds per style-transfer iteration: SqueezeNet vs VGG19, and the projected 200-iteration job."""
    logging.basicConfig(level=logging.WARNING)
    run(json_out=json_out, shared=shared, size=size)


if __name__ == "__main__":
    style()
