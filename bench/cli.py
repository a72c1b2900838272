"""`facegate bench ...`: benchmarks that print ratios against a baseline measured in the same run.

Each command imports its module inside the function, so adding a command never slows the others.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

REPO_PARENT = Path(__file__).resolve().parents[2]
DEFAULT_SHARED = Path(os.environ.get("FACEGATE_SHARED", REPO_PARENT / "shared"))


@click.group(name="bench")
def cli() -> None:
    """Benchmarks that print ratios against a baseline."""


@cli.command("pipeline")
@click.option("--models-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Built models folder (default: the `facegate models build` cache).")
@click.option("--shared", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_SHARED,
              show_default=True, help="Shared data folder (CelebA crops); packaged faces when absent.")
@click.option("--runs", type=click.IntRange(min=100), default=100, show_default=True,
              help="Timed runs per pipeline (medians are reported).")
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object on stdout.")
def pipeline(models_dir: Path | None, shared: Path, runs: int, as_json: bool) -> None:
    """Per-stage ms (detect, align, embed) of our int8 and float pipelines vs dlib, one thread."""
    from bench.pipeline import limit_threads

    limit_threads()
    from bench.pipeline import run_bench
    from models.runtime.assets import default_models_dir
    from models.runtime.manifest import ManifestError

    try:
        result = run_bench(models_dir or default_models_dir(), shared if shared.is_dir() else None, runs)
    except (ManifestError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"{result['runs']} runs on {result['images']} images ({result['source']}), one thread; "
               "median ms")
    click.echo(f"{'pipeline':<9}{'detect':>9}{'align':>9}{'embed':>9}{'total':>9}")
    for name, row in result["pipelines"].items():
        click.echo(f"{name:<9}{row['detect']:>9.2f}{row['align']:>9.2f}{row['embed']:>9.2f}{row['total']:>9.2f}")
    for name, ratio in result.get("ratio_dlib_over_ours", {}).items():
        click.echo(f"dlib_total / {name}_total = {ratio:.1f}x")
