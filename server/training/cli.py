"""``facegate train``: triplet training (fine-tune dlib or a distilled student), the pairs head and the
liveness head.

Each command prints exactly one JSON object on stdout (the run's summary); logs and progress bars go
to stderr. TensorFlow is imported only when a command runs.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path
from typing import Any

import click

logger = logging.getLogger(__name__)

DEFAULT_REPORT_ROOT = Path("var/training")


def _folds(text: str) -> tuple[int, ...]:
    try:
        folds = tuple(int(f) for f in text.split(",") if f.strip())
    except ValueError as exc:
        raise click.BadParameter(f"folds must be comma-separated integers, got {text!r}") from exc
    if not folds:
        raise click.BadParameter("give at least one fold")
    return folds


def _pairs_default(data: Path, pairs: Path | None) -> Path:
    if pairs is not None:
        return pairs
    candidate = (data if data.is_dir() else data.parent) / "pairs.csv"
    if not candidate.is_file():
        raise click.UsageError("no pairs.csv beside the data: give --pairs (the held-out pairs of the gate)")
    return candidate


def _report_dir(report: Path | None, prefix: str) -> Path:
    if report is not None:
        return report
    return DEFAULT_REPORT_ROOT / f"{prefix}-{dt.datetime.now(dt.UTC).strftime('%Y%m%d-%H%M%S')}"


def database_url(config: Path | None, db: str | None) -> str:
    """--db wins; else the server config's database (default SQLite in its data_dir)."""
    if db:
        return db
    from server.config import load_server_config

    return load_server_config(config).database_url


def _emit(payload: dict[str, Any]) -> None:
    click.echo(json.dumps(payload, sort_keys=True, default=str))


def common_options(func: Any) -> Any:
    """Options shared by both training commands."""
    options = [
        click.option("--data", type=click.Path(exists=True, path_type=Path), required=True,
                     help="Folder with one subfolder per person, or an identities.csv (path, identity)."),
        click.option("--pairs", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
                     help="pairs.csv with the held-out folds (default: beside --data)."),
        click.option("--folds", default="9,10", show_default=True, help="Held-out folds of --pairs."),
        click.option("--report", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="Report folder (default var/training/<kind>-<utc time>)."),
        click.option("--models-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
                     default=None, help="Built models (the chip cutter's detector); default: build output."),
        click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="Chip cache (default $FACEGATE_CACHE_DIR/chips or ~/.cache/facegate/chips)."),
        click.option("--seed", type=int, default=0, show_default=True, help="Random seed."),
        click.option("--no-progress", is_flag=True, help="No progress bars."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


cli = click.Group("train", help="Train embedders, the pairs head and the liveness head.")


@cli.command("triplet")
@common_options
@click.option("--init", type=click.Choice(["dlib", "student"]), default="student", show_default=True,
              help="Fine-tune the dlib-converted embedder, or train the compact student.")
@click.option("--epochs", type=click.IntRange(1, 10_000), default=10, show_default=True)
@click.option("--steps", "steps", type=click.IntRange(1, 100_000), default=50, show_default=True,
              help="P x K batches per epoch.")
@click.option("--p", "p", type=click.IntRange(2, 1024), default=16, show_default=True,
              help="Identities per batch.")
@click.option("--k", "k", type=click.IntRange(2, 64), default=4, show_default=True,
              help="Images per identity.")
@click.option("--mining", type=click.Choice(["batch-hard", "semi-hard", "random"]), default="semi-hard",
              show_default=True)
@click.option("--alpha", type=click.FloatRange(0.0, 4.0, min_open=True), default=0.2, show_default=True,
              help="Triplet margin (squared distances of unit vectors).")
@click.option("--reduce", type=click.Choice(["sum", "mean"]), default="sum", show_default=True)
@click.option("--lr", "lr", type=click.FloatRange(0.0, 1.0, min_open=True), default=1e-3, show_default=True)
@click.option("--freeze-blocks", type=click.IntRange(0, 1000), default=11, show_default=True,
              help="dlib: leading residual blocks kept frozen (dlib's net has 15).")
@click.option("--no-cache-trunk", is_flag=True, help="dlib: run the frozen trunk every step (slower).")
@click.option("--student-size", type=click.Choice(["96", "112"]), default="112", show_default=True)
@click.option("--student-width", type=click.FloatRange(0.0, 2.0, min_open=True), default=1.0,
              show_default=True)
@click.option("--student-activation", type=click.Choice(["relu6", "relu", "prelu"]), default="relu6",
              show_default=True, help="Student activation (prelu has no fast int8 kernel in LiteRT).")
@click.option("--distill", type=click.Choice(["none", "cosine", "mse"]), default="cosine", show_default=True,
              help="Student: distillation from the dlib teacher's precomputed embeddings.")
@click.option("--distill-weight", type=click.FloatRange(0.0, 100.0), default=1.0, show_default=True)
@click.option("--no-distill-center", is_flag=True,
              help="Distil toward the raw (uncentred) teacher embeddings.")
@click.option("--flip", is_flag=True,
              help="Mirror half the chips (teacher target unchanged; ignored with a cached trunk).")
@click.option("--resume", is_flag=True, help="Continue from the report folder's last checkpoint.")
@click.option("--no-export", is_flag=True, help="Skip the int8 export and parity check.")
@click.option("--no-reference", is_flag=True, help="Skip evaluating the unchanged dlib model.")
@click.option("--register", is_flag=True, help="Register the result as a candidate in the model registry.")
@click.option("--config", "server_config", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="Server config (for the registry database).")
@click.option("--db", default=None, help="SQLAlchemy URL of the registry database (overrides --config).")
def triplet(data: Path, pairs: Path | None, folds: str, report: Path | None, models_dir: Path | None,
            cache_dir: Path | None, seed: int, no_progress: bool, init: str, epochs: int, steps: int,
            p: int, k: int, mining: str, alpha: float, reduce: str, lr: float, freeze_blocks: int,
            no_cache_trunk: bool, student_size: str, student_width: float, student_activation: str,
            distill: str,
            distill_weight: float, no_distill_center: bool, flip: bool,
            resume: bool, no_export: bool, no_reference: bool, register: bool, server_config: Path | None,
            db: str | None) -> None:
    """Train with the triplet loss and online mining; evaluate on the held-out folds; report."""
    from server.training.data import DataError
    from server.training.models import ModelBuildError
    from server.training.trainer import TrainConfig, TrainingError
    from server.training.workflow import RunInputs, run_triplet

    config = TrainConfig.model_validate({
        "init": init, "epochs": epochs, "steps_per_epoch": steps, "p": p, "k": k, "mining": mining,
        "alpha": alpha, "reduce": reduce, "learning_rate": lr,
        "freeze_blocks": freeze_blocks if init == "dlib" else 0, "cache_trunk": not no_cache_trunk,
        "student_size": int(student_size), "student_width": student_width,
        "student_activation": student_activation,
        "distill": distill, "distill_weight": distill_weight, "distill_center": not no_distill_center,
        "flip": flip, "seed": seed})
    inputs = RunInputs(data=data, pairs_csv=_pairs_default(data, pairs), report_dir=_report_dir(report, init),
                       folds=_folds(folds), models_dir=models_dir, cache_dir=cache_dir, export=not no_export,
                       reference=not no_reference, resume=resume, progress=not no_progress)
    try:
        outcome = run_triplet(config, inputs)
    except (DataError, ModelBuildError, TrainingError) as exc:
        raise click.ClickException(str(exc)) from exc
    summary: dict[str, Any] = {"report": str(inputs.report_dir), "model": str(outcome.model_path),
                               "float": outcome.metrics.get("float"), "int8": outcome.metrics.get("int8"),
                               "reference_dlib_float": outcome.metrics.get("reference_dlib_float"),
                               "parity": outcome.metrics.get("parity"),
                               "final_active_fraction": outcome.metrics.get("final_active_fraction")}
    if register:
        from server.registry.registry import ModelRegistry

        with ModelRegistry.open(database_url(server_config, db)) as registry:
            current = registry.current("embedder")
            version = registry.register(
                "embedder", metrics=outcome.metrics, artifacts=outcome.artifacts,
                hyperparams=config.model_dump(mode="json"), data_hash=outcome.data_hash,
                parent=None if current is None else current.version,
                note=f"train triplet --init {init}; report {inputs.report_dir}")
        summary["version"] = version.version
    _emit(summary)


@cli.command("pairs-head")
@common_options
@click.option("--embedder", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A .keras or .tflite embedder (default: the built int8 embedder the doors run).")
@click.option("--kind", type=click.Choice(["abs", "chi2"]), default="abs", show_default=True,
              help="Pair features: weighted |difference| (DeepFace) or chi-squared.")
@click.option("--train-pairs", type=click.IntRange(100, 10_000_000), default=20000, show_default=True)
@click.option("--epochs", type=click.IntRange(1, 10_000), default=20, show_default=True)
@click.option("--lr", "lr", type=click.FloatRange(0.0, 1.0, min_open=True), default=1e-2, show_default=True)
def pairs_head(data: Path, pairs: Path | None, folds: str, report: Path | None, models_dir: Path | None,
               cache_dir: Path | None, seed: int, no_progress: bool, embedder: Path | None, kind: str,
               train_pairs: int, epochs: int, lr: float) -> None:
    """Train the DeepFace-style binary head on embedding pairs; compare it with cosine on held-out pairs."""
    from models.runtime.assets import default_models_dir
    from models.runtime.manifest import ManifestError, load_manifest
    from server.training.data import DataError
    from server.training.pairs_head import HeadTrainingError, run_pairs_head
    from server.training.workflow import RunInputs

    if embedder is None:
        folder = models_dir or default_models_dir()
        try:
            embedder = folder / load_manifest(folder).get("embedder-int8").file
        except ManifestError as exc:
            raise click.ClickException(f"{exc} (or pass --embedder)") from exc
    inputs = RunInputs(data=data, pairs_csv=_pairs_default(data, pairs),
                       report_dir=_report_dir(report, "head"), folds=_folds(folds), models_dir=models_dir,
                       cache_dir=cache_dir, progress=not no_progress)
    try:
        metrics = run_pairs_head(inputs, embedder, kind, train_pairs, epochs, lr, seed)
    except (DataError, HeadTrainingError) as exc:
        raise click.ClickException(str(exc)) from exc
    _emit({"report": str(inputs.report_dir), "model": metrics["model"], "head": metrics["head"],
           "cosine": metrics["cosine"]})


@cli.command("liveness")
@click.option("--labels", "labels_csvs", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              multiple=True, required=True,
              help="A labels CSV per dataset (repeat; path,label,subject,session; kinds.csv beside it).")
@click.option("--report", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Report folder (default var/training/liveness-<utc time>).")
@click.option("--models-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Built models folder (BlazeFace, MiniFASNet entries); default: build output.")
@click.option("--minifasnet", "minifasnet_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, envvar="FACEGATE_MINIFASNET_DIR",
              help="Folder with the MiniFASNet float32 .tflite files (or $FACEGATE_MINIFASNET_DIR).")
@click.option("--folds", type=click.IntRange(min=2), default=5, show_default=True,
              help="Subject folds per set for leave-subjects-out.")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep per-frame MiniFASNet logits here between runs.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def liveness(labels_csvs: tuple[Path, ...], report: Path | None, models_dir: Path | None,
             minifasnet_dir: Path | None, folds: int, cache_dir: Path | None, no_progress: bool) -> None:
    """Fine-tune a passive liveness head on MiniFASNet's pooled features; held-out figures for the gate."""
    from server.training.liveness import LivenessTrainingError, summary, train_liveness

    report_dir = _report_dir(report, "liveness")
    try:
        metrics = train_liveness(labels_csvs, report_dir, models_dir, minifasnet_dir, folds=folds,
                                 progress=not no_progress, cache_dir=cache_dir)
    except LivenessTrainingError as exc:
        raise click.ClickException(str(exc)) from exc
    _emit({"report": str(report_dir), "sets": metrics["heldout"]["trained_on"],
           "heldout": summary(metrics), "parity": metrics["parity"]})
