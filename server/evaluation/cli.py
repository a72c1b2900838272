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
    """Verification figures (AUC, EER, TAR at FAR 1e-2 and 1e-3) on the pairs protocol, and 10-fold.

    An image where no face is found makes its pairs fail (score -inf); fail_to_detect counts such images.
    ``tenfold``: each fold scored at thresholds chosen on the other folds (mean and sd over folds).
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
    ten = result["tenfold"]
    if ten is not None:
        held = ten["tar_at_far"]["0.001"]
        click.echo(f"{ten['folds']}-fold (threshold from the other folds): accuracy "
                   f"{_mean_sd(ten['accuracy'])}; at FAR 1e-3: TAR {_mean_sd(held['tar'])}, "
                   f"FAR {_mean_sd(held['far'])}")


def _mean_sd(figure: dict[str, float | None]) -> str:
    """'mean ± sd', or 'n/a' where no fold had the figure."""
    if figure["mean"] is None or figure["sd"] is None:
        return "n/a"
    return f"{figure['mean']:.4f} ± {figure['sd']:.4f}"


@cli.command("identify")
@click.option("--identities", "root", type=click.Path(exists=True, file_okay=False, path_type=Path),
              required=True, help="Folder with one subfolder of JPEG/PNG/PGM images per identity.")
@click.option("--pipeline", type=click.Choice(["dlib", "float", "int8"]), required=True,
              help="dlib reference (HOG + shape_predictor_5 + ResNet) or ours with the float/int8 embedder.")
@click.option("--enroll-per-person", "enroll_per_person", type=click.IntRange(min=1), default=1,
              show_default=True, help="Images enrolled per enrolled identity (the first K in name order).")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="Device config whose [decision], [gallery] and [detector] to apply "
                                 "(default: the calibrated defaults).")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the DET curve (FNIR vs FPIR) to this PNG.")
@click.option("--exclude", default="", help="Identities to leave out, comma-separated (known label errors, "
                                            "e.g. one person under two names).")
@click.option("--models-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Built models folder (default: the `facegate models build` cache).")
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object on stdout.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def identify(root: Path, pipeline: str, enroll_per_person: int, config_path: Path | None, plot: Path | None,
             exclude: str, models_dir: Path | None, as_json: bool, no_progress: bool) -> None:
    """One-shot open-set 1:N figures: FNIR at FPIR 1e-2 and 1e-3, and the device's rule as configured.

    Half of the identities (by a hash of the name) enroll their first K images; their other images are
    mated probes and every image of the other half is a stranger. A probe without a face is a miss if
    mated and a rejection if not.
    """
    from facegate.configio import ConfigError
    from models.runtime.interpreter import ModelLoadError, RuntimeUnavailableError
    from models.runtime.manifest import ManifestError
    from server.evaluation.identify import IdentifyError, run_identify
    from server.evaluation.verify import PairsError

    try:
        result = run_identify(root, pipeline, enroll_per_person, config_path, models_dir, plot,
                              progress=not no_progress and not as_json,
                              exclude=frozenset(n for n in exclude.split(",") if n))
    except (IdentifyError, PairsError, ConfigError, ManifestError, ModelLoadError,
            RuntimeUnavailableError) as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(result))
        return
    fnir, cfg = result["fnir_at_fpir"], result["at_config"]
    click.echo(f"{result['pipeline']}: {result['enrolled']} enrolled, {result['mated']} mated, "
               f"{result['nonmated']} non-mated probes, fail_to_detect {result['fail_to_detect']}")
    click.echo(f"FNIR @ FPIR 1e-2 {fnir['0.01']:.4f}  @ 1e-3 {fnir['0.001']:.4f}")
    click.echo(f"at tau {cfg['tau']:.4f}, delta {cfg['delta']:.4f}: FNIR {cfg['fnir']:.4f}  "
               f"FPIR {cfg['fpir']:.4f}  wrong id {cfg['wrong_id_rate']:.4f}")
