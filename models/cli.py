"""``facegate models build``: convert and collect every model into a folder with a manifest.

TensorFlow is imported only when the command runs, never when the CLI is listed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from models.runtime.assets import AssetNotFoundError, default_models_dir

logger = logging.getLogger(__name__)

cli = click.Group("models", help="Build, list, promote and roll back models.")


@cli.command("build")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder (default: $FACEGATE_MODELS_DIR, else models/artifacts in a checkout).")
@click.option("--minifasnet", "minifasnet", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None,
              help="Folder with MiniFASNet *_float32.tflite files (or $FACEGATE_MINIFASNET_DIR).")
@click.option("--calibration", "calibration", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, help="Folder of 150x150 site chips added to the int8 calibration set.")
@click.option("--no-progress", is_flag=True, help="Do not draw a progress bar.")
def build(out: Path | None, minifasnet: Path | None, calibration: Path | None, no_progress: bool) -> None:
    """Build every model artifact and print the manifest path."""
    from models.convert.artifacts import BuildError
    from models.convert.builder import build_all
    from models.convert.calibration import CalibrationError
    from models.convert.dlib_format import DlibFormatError
    from models.convert.export import ExportError

    target = out if out is not None else default_models_dir()
    try:
        path = build_all(target, minifasnet_dir=minifasnet, calibration_dir=calibration,
                         progress=not no_progress)
    except (BuildError, CalibrationError, DlibFormatError, ExportError, AssetNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(str(path))


@cli.command("fetch-liveness")
@click.option("--from", "source", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Take the MiniFASNet files from this folder (offline) instead of downloading them.")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Models folder to add them to (default: as for `models build`).")
@click.option("--no-progress", is_flag=True, help="Do not draw a progress bar.")
def fetch_liveness(source: Path | None, out: Path | None, no_progress: bool) -> None:
    """Install the Apache-2.0 MiniFASNet passive-liveness models (sha256-pinned) into the models folder."""
    from models.convert.artifacts import BuildError
    from models.convert.builder import build_all
    from models.convert.liveness_fetch import FetchError, fetch_minifasnet

    target = out if out is not None else default_models_dir()
    folder = target / "sources" / "minifasnet"
    try:
        files = fetch_minifasnet(folder, source)
        path = build_all(target, minifasnet_dir=folder, progress=not no_progress)
    except (FetchError, BuildError, AssetNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    for file in files:
        click.echo(f"verified {file}")
    click.echo(str(path))
