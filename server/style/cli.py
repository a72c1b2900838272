"""``facegate style``: run neural style transfer from the command line, and write sample inputs."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import click
from pydantic import ValidationError

from core.files import atomic_write_bytes
from server.style.backbones import BACKBONES, BackboneError, make_backbone
from server.style.images import (
    OUTPUT_MODE,
    StyleInputError,
    encode_png,
    make_strip,
    read_image,
    resize_longest,
    resize_to,
)
from server.style.params import CONTENT_NORMS, IterationReport, StyleParams
from server.style.transfer import StyleTransfer, StyleTransferError

logger = logging.getLogger(__name__)


def _csv(value: str | None) -> tuple[str, ...] | None:
    return tuple(part.strip() for part in value.split(",") if part.strip()) if value else None


def _floats(value: str | None) -> tuple[float, ...] | None:
    names = _csv(value)
    if names is None:
        return None
    try:
        return tuple(float(v) for v in names)
    except ValueError as exc:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from exc


@click.group(name="style")
def cli() -> None:
    """Neural style transfer (Gatys et al.)."""


@cli.command("run")
@click.argument("content", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("style", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write the generated PNG.")
@click.option("--backbone", type=click.Choice(sorted(BACKBONES)), default="squeezenet", show_default=True)
@click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              envvar="FACEGATE_STYLE_WEIGHTS", help="Backbone weights (.h5) [env FACEGATE_STYLE_WEIGHTS].")
@click.option("--random-weights", is_flag=True, help="Untrained backbone: for timing only.")
@click.option("--allow-download", is_flag=True, help="Let Keras download VGG19 ImageNet weights.")
@click.option("--size", type=int, default=256, show_default=True, help="Longest side of the output.")
@click.option("--iters", type=int, default=200, show_default=True)
@click.option("--alpha", type=float, default=10.0, show_default=True, help="Content weight.")
@click.option("--beta", type=float, default=40.0, show_default=True, help="Style weight.")
@click.option("--gamma", type=float, default=0.0, show_default=True, help="Total-variation weight.")
@click.option("--content-layer", default=None, help="Content layer (default: the backbone's).")
@click.option("--style-layers", default=None, help="Comma-separated style layers (default: the backbone's).")
@click.option("--style-weights", default=None, help="Comma-separated lambdas, one per style layer.")
@click.option("--content-norm", type=click.Choice(CONTENT_NORMS), default="course", show_default=True)
@click.option("--optimizer", type=click.Choice(["adam", "lbfgs"]), default="lbfgs", show_default=True)
@click.option("--lr", type=float, default=4.0, show_default=True, help="Adam step in pixel units.")
@click.option("--init", type=click.Choice(["content", "noise"]), default="content", show_default=True)
@click.option("--noise-ratio", type=float, default=0.2, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--strip-every", type=int, default=0, show_default=True,
              help="Also write OUT.strip.png with an image every N iterations (0: no strip).")
@click.option("--triptych", is_flag=True, help="Write content | style | result side by side to OUTPUT.")
def run(content: Path, style: Path, output: Path, backbone: str, weights: Path | None, random_weights: bool,
        allow_download: bool, size: int, iters: int, alpha: float, beta: float, gamma: float,
        content_layer: str | None, style_layers: str | None, style_weights: str | None, content_norm: str,
        optimizer: str, lr: float, init: str, noise_ratio: float, seed: int, strip_every: int,
        triptych: bool) -> None:
    """Stylise CONTENT with the style of STYLE and write OUTPUT (PNG)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    try:
        params = StyleParams.model_validate(dict(
            size=size, iters=iters, alpha=alpha, beta=beta, gamma=gamma, content_layer=content_layer,
            style_layers=_csv(style_layers), style_weights=_floats(style_weights), content_norm=content_norm,
            optimizer=optimizer, learning_rate=lr, init=init, noise_ratio=noise_ratio, seed=seed,
            strip_every=strip_every,
        ))
    except ValidationError as exc:
        raise click.BadParameter(str(exc)) from exc
    try:
        net = make_backbone(backbone, weights, random_weights=random_weights, allow_download=allow_download)
        content_rgb = resize_longest(read_image(content), params.size)
        style_rgb = read_image(style)
    except (BackboneError, StyleInputError) as exc:
        raise click.ClickException(str(exc)) from exc

    console = Console(stderr=True)
    cancel = threading.Event()
    started = time.perf_counter()
    with Progress(TextColumn("[bold]style[/]"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("J={task.fields[cost]}"), TimeRemainingColumn(), console=console) as bar:
        task = bar.add_task("optimise", total=params.iters, cost="-")

        def progress(report: IterationReport) -> None:
            bar.update(task, completed=report.iteration, cost=f"{report.total:.4g}")

        try:
            result = StyleTransfer(net).run(content_rgb, style_rgb, params, on_iteration=progress,
                                            cancel=cancel)
        except KeyboardInterrupt:
            cancel.set()
            raise click.Abort() from None
        except (StyleTransferError, BackboneError) as exc:
            raise click.ClickException(str(exc)) from exc
    seconds = time.perf_counter() - started
    image = result.image
    if triptych:
        height, width = image.shape[:2]
        image = make_strip([content_rgb, resize_to(style_rgb, height, width), image])
    atomic_write_bytes(output, encode_png(image), mode=OUTPUT_MODE)
    if result.strip is not None:
        atomic_write_bytes(output.with_suffix(".strip.png"), encode_png(result.strip), mode=OUTPUT_MODE)
    last = result.history[-1] if result.history else None
    loop_s = last.elapsed_s if last else 0.0
    console.print(
        f"wrote {output} ({result.image.shape[1]}x{result.image.shape[0]}) after {result.iterations} "
        f"iterations in {seconds:.1f} s ({seconds - loop_s:.1f} s setup, "
        f"{loop_s / max(result.iterations, 1):.3f} s/iteration)"
        + (f"; J={last.total:.4g} content={last.content:.4g} style={last.style:.4g} tv={last.tv:.4g}"
           if last else "")
    )


@cli.command("samples")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def samples(directory: Path) -> None:
    """Write astronaut.png (public domain, from scikit-image) and mosaic.png (procedural) to DIRECTORY."""
    from server.style.samples import astronaut, mosaic

    atomic_write_bytes(directory / "astronaut.png", encode_png(astronaut()), mode=OUTPUT_MODE)
    atomic_write_bytes(directory / "mosaic.png", encode_png(mosaic()), mode=OUTPUT_MODE)
    click.echo(f"wrote {directory / 'astronaut.png'} and {directory / 'mosaic.png'}", err=True)
