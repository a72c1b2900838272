"""``facegate models list|register|baseline|promote|rollback|visualize`` (merged into the ``models`` group).

Registry commands print one JSON object on stdout; refusals exit with status 1 and say why on stderr.
``promote`` and ``rollback`` run the promotion hooks with the server context of ``--config`` (chips,
chip key, models, signing key): the gallery is re-embedded and a signed bundle is built, or nothing
changes and the command fails.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from server.registry.registry import KINDS
from server.training.cli import database_url

if TYPE_CHECKING:
    from server.registry.promotion import PromotionContext
    from server.registry.registry import ModelRegistry

logger = logging.getLogger(__name__)

MAX_VIS_IMAGES = 400  # images scanned for the top patches: enough for 9 distinct winners per unit

cli = click.Group("models", help="List, promote and roll back models; visualise units.")

db_options = [
    click.option("--config", "server_config", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                 default=None, help="Server config (its database holds the registry)."),
    click.option("--db", default=None, help="SQLAlchemy URL of the registry database (overrides --config)."),
]


def with_db(func: Any) -> Any:
    """Add --config/--db."""
    for option in reversed(db_options):
        func = option(func)
    return func


def _emit(payload: Any) -> None:
    click.echo(json.dumps(payload, sort_keys=True, default=str))


@contextmanager
def _promotion(server_config: Path | None,
               db: str | None) -> Iterator[tuple[ModelRegistry, PromotionContext]]:
    """The registry, with the promotion hooks installed on the server context (``--db`` wins for the URL)."""
    from facegate.configio import ConfigError
    from server.config import load_server_config
    from server.db.session import Database, DatabaseError
    from server.registry.promotion import PromotionContext
    from server.registry.registry import ModelRegistry

    try:
        config = load_server_config(server_config)
        database = Database(db or config.database_url, config.database.echo, config.database.busy_timeout_ms)
        database.migrate()
    except (ConfigError, DatabaseError) as exc:
        raise click.ClickException(str(exc)) from exc
    with ModelRegistry(database, owns=True) as registry:
        yield registry, PromotionContext(config, database, progress=True)


def _view(version: Any) -> dict[str, Any]:
    tar = {key: (version.metrics.get(key) or {}).get("tar_at_far", {}).get("0.001")
           for key in ("float", "int8")}
    extra: dict[str, Any] = {}
    if version.kind == "liveness" and "heldout" in version.metrics:
        from server.training.liveness import summary

        extra["liveness"] = summary(version.metrics)
    return {**extra, "version": version.version, "kind": version.kind, "status": version.status,
            "parent": version.parent_version, "replaces": version.replaces_version,
            "tar_at_far_0.001": tar, "parity": version.metrics.get("parity", {}).get("mean_cosine"),
            "data_hash": version.data_hash[:12], "created_at": version.created_at.isoformat(),
            "promoted_at": None if version.promoted_at is None else version.promoted_at.isoformat()}


@cli.command("list")
@with_db
@click.option("--kind", type=click.Choice(list(KINDS)), default=None)
def list_models(server_config: Path | None, db: str | None, kind: str | None) -> None:
    """List registered model versions with their held-out figures."""
    from server.registry.registry import ModelRegistry

    with ModelRegistry.open(database_url(server_config, db)) as registry:
        _emit({"models": [_view(v) for v in registry.versions(kind)]})


@cli.command("register")
@with_db
@click.argument("report", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--kind", type=click.Choice(list(KINDS)), default="embedder", show_default=True)
@click.option("--parent", default=None, help="Parent version (default: the current promoted one).")
def register(server_config: Path | None, db: str | None, report: Path, kind: str, parent: str | None) -> None:
    """Register a training report folder (metrics.json + exported files) as a candidate."""
    from server.registry.registry import ModelRegistry, RegistryError

    try:
        metrics = json.loads((report / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"{report} has no readable metrics.json: {exc}") from exc
    export = report / "export"
    if kind == "liveness":
        from server.registry.model_folder import ModelFolderError, liveness_artifacts

        try:
            artifacts = liveness_artifacts(report)
        except ModelFolderError as exc:
            raise click.ClickException(str(exc)) from exc
    else:
        artifacts = {"keras": str(report / "model.keras")}
        for name, file in (("float32", "embedder-float32.tflite"), ("int8", "embedder-int8.tflite")):
            if (export / file).is_file():
                artifacts[name] = str(export / file)
    with ModelRegistry.open(database_url(server_config, db)) as registry:
        try:
            current = registry.current(kind)
            version = registry.register(kind, metrics=metrics, artifacts=artifacts,
                                        hyperparams=metrics.get("config", {}),
                                        data_hash=str(metrics.get("data_hash", "")),
                                        parent=parent or (None if current is None else current.version),
                                        note=f"registered from {report}")
        except RegistryError as exc:
            raise click.ClickException(str(exc)) from exc
        _emit(_view(version))


@cli.command("baseline")
@with_db
@click.option("--models-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None)
@click.option("--pairs", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="pairs.csv holding the held-out folds.")
@click.option("--folds", default="9,10", show_default=True)
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None)
def baseline(server_config: Path | None, db: str | None, models_dir: Path | None, pairs: Path, folds: str,
             cache_dir: Path | None) -> None:
    """Evaluate the built dlib-converted embedder on the held-out folds and register it (then promote it)."""
    from server.registry.registry import ModelRegistry
    from server.training.baseline import baseline_metrics
    from server.training.cli import _folds

    metrics, artifacts = baseline_metrics(models_dir, pairs, _folds(folds), cache_dir)
    with ModelRegistry.open(database_url(server_config, db)) as registry:
        version = registry.register("embedder", metrics=metrics, artifacts=artifacts, hyperparams={},
                                    note="built dlib-converted embedder (facegate models build)")
        _emit(_view(version))


@cli.command("promote")
@with_db
@click.argument("version")
@click.option("--tolerance", type=click.FloatRange(0.0, 1.0), default=0.01, show_default=True,
              help="Allowed TAR@FAR=1e-3 drop against the current model.")
@click.option("--metric", type=click.Choice(["int8", "float"]), default="int8", show_default=True)
@click.option("--min-parity", type=click.FloatRange(0.0, 1.0), default=0.99, show_default=True,
              help="Minimum mean cosine between the int8 and float models.")
@click.option("--folds", default="9,10", show_default=True, help="Held-out folds the figures must come from.")
@click.option("--liveness-protocol", "liveness_protocols", multiple=True,
              type=click.Choice(["leave-one-dataset-out", "leave-subjects-out"]),
              help="Held-out protocols a liveness head must win (repeat; default both). leave-subjects-out "
                   "alone trusts a head only for the cameras it was trained on: UNSAFE for any other, and "
                   "recorded in the registry as such.")
def promote(server_config: Path | None, db: str | None, version: str, tolerance: float, metric: str,
            min_parity: float, folds: str, liveness_protocols: tuple[str, ...]) -> None:
    """Promote a candidate through the evaluation gate (refused, loudly, if worse); re-embed and bundle."""
    from server.registry import gate
    from server.registry.promotion import promotion_hooks
    from server.registry.registry import RegistryError
    from server.training.cli import _folds

    settings: dict[str, Any] = {"tolerance": tolerance, "metric": metric, "min_parity_cosine": min_parity,
                                "eval_folds": _folds(folds)}
    if liveness_protocols:
        settings["liveness_protocols"] = tuple(dict.fromkeys(liveness_protocols))
    cfg = gate.GateConfig.model_validate(settings)
    with _promotion(server_config, db) as (registry, context):
        try:
            decision = gate.promote(registry, version, cfg, hooks=promotion_hooks(context))
        except gate.PromotionRefusedError as exc:
            _emit({"promoted": False, **exc.decision.as_dict()})
            raise click.ClickException(str(exc)) from exc
        except (gate.PromotionHookError, RegistryError) as exc:
            raise click.ClickException(str(exc)) from exc
        _emit({"promoted": True, **decision.as_dict(), **context.outcomes})


@cli.command("rollback")
@with_db
@click.option("--kind", type=click.Choice(list(KINDS)), default="embedder", show_default=True)
def rollback(server_config: Path | None, db: str | None, kind: str) -> None:
    """Withdraw the promoted version and restore the one it replaced (its kept templates, a new bundle);
    a liveness head that replaced nothing is withdrawn, and the doors go back to the MiniFASNet scorer."""
    from server.registry import gate
    from server.registry.promotion import promotion_hooks
    from server.registry.registry import RegistryError

    with _promotion(server_config, db) as (registry, context):
        try:
            withdrawn, restored = gate.rollback(registry, kind, hooks=promotion_hooks(context))
        except (gate.PromotionHookError, RegistryError) as exc:
            raise click.ClickException(str(exc)) from exc
        _emit({"withdrawn": withdrawn.version, "restored": None if restored is None else restored.version,
               **context.outcomes})


def _load_any(model: str) -> Any:
    """'dlib' (the converted embedder) or a .keras file."""
    if model == "dlib":
        from server.training.models import load_dlib_teacher

        return load_dlib_teacher()
    from server.training.trainer import load_model

    return load_model(Path(model))


def _images(folder: Path, chips: bool, models_dir: Path | None, limit: int) -> Any:
    """(N,150,150,3) uint8 chips: the images themselves (--chips) or cut by the product pipeline."""
    import numpy as np

    from server.training.chips import PipelineChipMaker, make_chips
    from server.training.data import IMAGE_SUFFIXES, Sample

    everything = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    # Evenly spaced over the sorted list, so a folder-per-person tree gives many people, not the first few.
    files = everything[::max(1, len(everything) // limit)][:limit]
    if not files:
        raise click.ClickException(f"no images in {folder}")
    if chips:
        import cv2

        from models.face.image import ImageError, decode_image

        try:
            return np.stack([cv2.resize(decode_image(p.read_bytes()), (150, 150)) for p in files])
        except (OSError, ImageError) as exc:
            raise click.ClickException(f"cannot read a chip in {folder}: {exc}") from exc
    samples = [Sample(p, str(p.relative_to(folder)), p.parent.name) for p in files]
    with PipelineChipMaker(models_dir) as maker:
        return make_chips(samples, maker, name="visualize").only_ok().chips


@cli.command("visualize")
@click.option("--model", "model", default="dlib", show_default=True,
              help="'dlib' (the converted embedder) or a .keras file from `facegate train`.")
@click.option("--layer", default=None, help="Layer name; omit to list the spatial layers.")
@click.option("--units", "units", type=click.IntRange(1, 64), default=8, show_default=True)
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Folder of face images (searched recursively).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="PNG to write.")
@click.option("--pick", type=click.Choice(["top", "first"]), default="top", show_default=True,
              help="Most active units on average, or simply the first K.")
@click.option("--chips", is_flag=True, help="The images are already aligned 150x150 chips.")
@click.option("--max-images", type=click.IntRange(9, 100_000), default=MAX_VIS_IMAGES, show_default=True)
@click.option("--models-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None)
def visualize(model: str, layer: str | None, units: int, images: Path | None, out: Path | None, pick: str,
              chips: bool, max_images: int, models_dir: Path | None) -> None:
    """Zeiler & Fergus grid: for each of K units, the 9 image patches that activate it most."""
    from server.training.visualize import VisualizeError, layer_names
    from server.training.visualize import visualize as run

    network = _load_any(model)
    if layer is None:
        _emit({"model": network.name, "layers": layer_names(network)})
        return
    if images is None or out is None:
        raise click.UsageError("--images and --out are needed to draw a layer")
    try:
        summary = run(network, layer, _images(images, chips, models_dir, max_images), units, out,
                      "top" if pick == "top" else "first")
    except VisualizeError as exc:
        raise click.ClickException(str(exc)) from exc
    _emit(summary)
