"""`facegate eval calibrate`: the device threshold tau for a target FAR, from pair score distributions.

With ``--open-set`` it calibrates for the door's real job instead, 1:N search at a target FPIR per
gallery size (``server.evaluation.openset``): that is where the shipped defaults come from.

1:1 mode: impostor and genuine cosine scores come from the same pipeline the doors run (int8 by
default), each image embedded once (``server.evaluation.verify.embed_pairs``, cached on disk). tau is
chosen on the calibration folds (1-8 by default): the lowest threshold whose impostor accept rate does
not exceed the target FAR. The metrics module accepts scores strictly above its threshold while the
device accepts ``score >= tau``, so tau is the next float above that threshold. TAR is reported at tau
on the calibration folds (the JSON ``tar``) and on the held-out folds (the other folds in the file,
logged and shown without ``--json``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import numpy.typing as npt

from server.evaluation.metrics import MetricsError, threshold_at_far

logger = logging.getLogger(__name__)

DEFAULT_FOLDS = "1,2,3,4,5,6,7,8"
DEFAULT_FAR = 1e-3


@dataclass(frozen=True, slots=True)
class Rates:
    """Accept rates of genuine and impostor pairs at a threshold, with the pair counts."""

    tar: float
    far: float
    genuine: int
    impostor: int


def rates_at(scores: npt.NDArray[np.float64], labels: npt.NDArray[np.int_], tau: float) -> Rates:
    """TAR and FAR when accepting ``score >= tau`` (failed pairs, -inf, are never accepted)."""
    genuine, impostor = scores[labels == 1], scores[labels == 0]
    return Rates(
        tar=float(np.mean(genuine >= tau)) if genuine.size else float("nan"),
        far=float(np.mean(impostor >= tau)) if impostor.size else float("nan"),
        genuine=int(genuine.size),
        impostor=int(impostor.size),
    )


def choose_tau(scores: npt.NDArray[np.float64], labels: npt.NDArray[np.int_], far: float) -> float:
    """Lowest tau with FAR(score >= tau) <= far on these pairs."""
    threshold = threshold_at_far(scores, labels, far)
    if not np.isfinite(threshold):
        return -1.0  # every impostor may pass: the cosine floor
    return float(np.nextafter(threshold, np.inf))


def run_calibrate(pairs_csv: Path, far: float, folds: frozenset[int], pipeline: str = "int8",
                  models_dir: Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Embed, score, choose tau on ``folds`` and measure TAR there and on the other folds."""
    from server.evaluation.verify import PIPELINES, PairsError, embed_pairs, pair_scores, read_pairs

    rows = read_pairs(pairs_csv)
    calib = [r for r in rows if r.fold in folds]
    held = [r for r in rows if r.fold not in folds]
    if not calib:
        raise PairsError(f"no pairs in {pairs_csv} for folds {sorted(folds)}")
    if pipeline not in PIPELINES:
        raise PairsError(f"unknown pipeline '{pipeline}' (known: {sorted(PIPELINES)})")
    _paths, vectors = embed_pairs(pairs_csv, rows, pipeline, models_dir, progress)
    c_scores = pair_scores(calib, vectors)
    c_labels = np.array([r.same for r in calib])
    tau = choose_tau(c_scores, c_labels, far)
    calib_rates = rates_at(c_scores, c_labels, tau)
    result: dict[str, Any] = {"far": far, "tau": tau, "tar": calib_rates.tar, "calibration": calib_rates}
    logger.info("calibration folds %s: %d genuine / %d impostor pairs; tau %.4f gives TAR %.4f at FAR %.4g",
                sorted(folds), calib_rates.genuine, calib_rates.impostor, tau, calib_rates.tar,
                calib_rates.far)
    if calib_rates.impostor and far * calib_rates.impostor < 1:
        logger.warning("only %d impostor pairs: a FAR of %g cannot be resolved (needs > %d)",
                       calib_rates.impostor, far, int(1 / far))
    if held:
        h_scores = pair_scores(held, vectors)
        h_rates = rates_at(h_scores, np.array([r.same for r in held]), tau)
        result["heldout"] = h_rates
        logger.info("held-out folds %s: TAR %.4f, FAR %.4g at tau %.4f (%d genuine / %d impostor pairs)",
                    sorted({r.fold for r in held}), h_rates.tar, h_rates.far, tau, h_rates.genuine,
                    h_rates.impostor)
    return result


def _parse_folds(value: str) -> frozenset[int]:
    try:
        folds = frozenset(int(part) for part in value.split(",") if part.strip())
    except ValueError as exc:
        raise click.BadParameter(f"folds must be comma-separated integers, got '{value}'") from exc
    if not folds:
        raise click.BadParameter("give at least one fold")
    return folds


def _open_set(root: Path | None, fpir: float, sizes: tuple[int, ...], pipeline: str, models_dir: Path | None,
              draws: int, exclude: str, as_json: bool, no_progress: bool) -> None:
    """The --open-set mode of the command."""
    from server.evaluation.identify import IdentifyError
    from server.evaluation.openset import GALLERY_SIZES, run_open_set

    if root is None:
        raise click.UsageError("--open-set needs --identities DIR (one subfolder per identity)")
    try:
        result = run_open_set(root, fpir, sizes or GALLERY_SIZES, pipeline, models_dir, draws,
                              frozenset(n for n in exclude.split(",") if n),
                              progress=not no_progress and not as_json)
    except IdentifyError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(result))
        return
    parts = result["identities"]
    click.echo(f"open-set, one-shot, target FPIR {fpir:g}: rule chosen on all {sum(parts.values())} "
               f"identities; held-out = cross calibration between parts of {parts['tune']} and "
               f"{parts['report']} identities "
               f"({draws} draws)")
    click.echo(f"{'N':>7} {'tau':>7} {'delta':>6} {'FNIR':>7} {'FPIR':>8} {'held-out FNIR':>14} {'FPIR':>8}")
    for row in result["rows"]:
        held = row["heldout"]
        click.echo(f"{row['gallery_size']:>7} {row['tau']:>7.4f} {row['delta']:>6.3f} {row['fnir']:>7.4f} "
                   f"{row['fpir']:>8.5f} {held['fnir']:>14.4f} {held['fpir']:>8.5f}")
    click.echo("these rows belong in device/decide/operating_point.py (CALIBRATED)")


@click.command("calibrate")
@click.option("--pairs", "pairs_csv", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="Pairs CSV (fold,path_a,path_b,same; paths relative to it): 1:1 mode.")
@click.option("--far", type=click.FloatRange(0.0, 1.0, min_open=True), default=DEFAULT_FAR, show_default=True,
              help="Target false accept rate (1:1 mode).")
@click.option("--folds", default=DEFAULT_FOLDS, show_default=True,
              help="Folds used to choose tau; TAR is also reported on the other folds (1:1 mode).")
@click.option("--open-set", "open_set", is_flag=True,
              help="Calibrate for 1:N open-set search instead: tau and delta per gallery size at --fpir.")
@click.option("--identities", "root", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, help="Open set: folder with one subfolder of images per identity.")
@click.option("--fpir", type=click.FloatRange(0.0, 1.0, min_open=True), default=DEFAULT_FAR,
              show_default=True,
              help="Open set: target false positive identification rate (strangers let in).")
@click.option("--gallery-size", "sizes", type=click.IntRange(min=1), multiple=True,
              help="Open set: persons enrolled (repeatable; default 10, 100, 1000, 10000).")
@click.option("--draws", type=click.IntRange(min=1), default=10, show_default=True,
              help="Open set: random role draws pooled per gallery size.")
@click.option("--exclude", default="", help="Open set: identities to leave out, comma-separated "
                                            "(known label errors, e.g. one person under two names).")
@click.option("--pipeline", type=click.Choice(["int8", "float"]), default="int8", show_default=True,
              help="Which embedder the door runs.")
@click.option("--models-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Built models folder (default: the `facegate models build` cache).")
@click.option("--json", "as_json", is_flag=True,
              help='Print one JSON object on stdout (1:1 mode: exactly {"far", "tau", "tar"}).')
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def calibrate(pairs_csv: Path | None, far: float, folds: str, open_set: bool, root: Path | None, fpir: float,
              sizes: tuple[int, ...], draws: int, exclude: str, pipeline: str, models_dir: Path | None,
              as_json: bool, no_progress: bool) -> None:
    """Choose the decision threshold: tau for a 1:1 FAR, or (--open-set) tau and delta per gallery size."""
    from models.runtime.interpreter import ModelLoadError, RuntimeUnavailableError
    from models.runtime.manifest import ManifestError
    from server.evaluation.verify import PairsError

    try:
        if open_set:
            _open_set(root, fpir, sizes, pipeline, models_dir, draws, exclude, as_json, no_progress)
            return
        if pairs_csv is None:
            raise click.UsageError("give --pairs CSV (1:1 calibration) or --open-set --identities DIR")
        result = run_calibrate(pairs_csv, far, _parse_folds(folds), pipeline, models_dir,
                               progress=not no_progress and not as_json)
    except (PairsError, MetricsError, ManifestError, ModelLoadError, RuntimeUnavailableError) as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps({"far": result["far"], "tau": result["tau"], "tar": result["tar"]}))
        return
    calib: Rates = result["calibration"]
    click.echo(f"tau {result['tau']:.4f} for FAR {far:g}: TAR {calib.tar:.4f} on folds {folds} "
               f"({calib.genuine} genuine, {calib.impostor} impostor pairs, FAR {calib.far:.4g})")
    held: Rates | None = result.get("heldout")
    if held is not None:
        click.echo(f"held-out: TAR {held.tar:.4f}, FAR {held.far:.4g} "
                   f"({held.genuine} genuine, {held.impostor} impostor pairs)")
    click.echo(f"set [decision] tau = {result['tau']:.4f} in the device config")
