"""`facegate eval ...`: offline evaluation commands (other modules add theirs to ``cli``)."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.group(name="eval")
def cli() -> None:
    """Evaluate verification, calibrate thresholds, measure liveness."""


def _folds(value: str | None) -> frozenset[int] | None:
    if not value:
        return None
    try:
        return frozenset(int(part) for part in value.split(",") if part.strip())
    except ValueError as exc:
        raise click.BadParameter(f"folds must be comma-separated integers, got '{value}'") from exc


@cli.command("verify")
@click.option("--pairs", "pairs_csv", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              required=True, help="Pairs CSV (fold,path_a,path_b,same; paths relative to it).")
@click.option("--pipeline", type=click.Choice(["dlib", "float", "int8"]), required=True,
              help="dlib reference (HOG + shape_predictor_5 + ResNet) or ours with the float/int8 embedder.")
@click.option("--models-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Built models folder (default: the `facegate models build` cache).")
@click.option("--folds", default=None, help="Only these folds, e.g. '9,10' (default: all).")
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object on stdout.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def verify(pairs_csv: Path, pipeline: str, models_dir: Path | None, folds: str | None, as_json: bool,
           no_progress: bool) -> None:
    """Verification figures (AUC, EER, TAR at FAR 1e-2 and 1e-3) on the pairs protocol.

    An image where no face is found makes its pairs fail (score -inf); fail_to_detect counts such images.
    """
    from models.runtime.interpreter import ModelLoadError, RuntimeUnavailableError
    from models.runtime.manifest import ManifestError
    from server.evaluation.metrics import MetricsError
    from server.evaluation.verify import PairsError, run_verify

    try:
        result = run_verify(pairs_csv, pipeline, models_dir, _folds(folds), progress=not no_progress)
    except (PairsError, MetricsError, ManifestError, ModelLoadError, RuntimeUnavailableError) as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(result))
        return
    tar = result["tar_at_far"]
    click.echo(f"{result['pipeline']}: {result['pairs']} pairs  AUC {result['auc']:.4f}  "
               f"EER {result['eer']:.4f}  TAR@1e-2 {tar['0.01']:.4f}  TAR@1e-3 {tar['0.001']:.4f}  "
               f"fail_to_detect {result['fail_to_detect']}")
