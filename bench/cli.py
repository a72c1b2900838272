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


@cli.command("fleet")
@click.option("--devices", type=click.IntRange(1, 10_000), default=200, show_default=True,
              help="Simulated doors, spread evenly over the sites.")
@click.option("--sites", type=click.IntRange(1, 50), default=2, show_default=True,
              help="Site brokers, each bridged to the central one.")
@click.option("--duration", type=click.FloatRange(1, 86_400), default=60.0, show_default=True,
              help="Seconds the doors make events.")
@click.option("--db", "db", type=click.Choice(["sqlite", "postgresql"]), default="sqlite", show_default=True,
              help="A SQLite file or a throwaway PostgreSQL cluster.")
@click.option("--servers", type=click.IntRange(1, 8), default=1, show_default=True,
              help="Server processes per site (more than one share the site's ingest).")
@click.option("--rate", type=click.FloatRange(0.01, 1000), default=None,
              help="Events per second per door [default: bench.fleet.EVENTS_PER_DOOR_S, 1].")
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object on stdout.")
def fleet(devices: int, sites: int, duration: float, db: str, servers: int, rate: float | None,
          as_json: bool) -> None:
    """Doors on bridged site brokers -> server replicas -> database: every event stored exactly once?"""
    from rich.console import Console
    from rich.progress import Progress

    from bench.fleet import EVENTS_PER_DOOR_S, BenchError, render, run_fleet

    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("starting", total=1.0)

        def progress(what: str, done: float) -> None:
            bar.update(task, description=what, completed=done)

        try:
            result = run_fleet(devices, sites, duration, "postgresql" if db == "postgresql" else "sqlite",
                               servers, rate or EVENTS_PER_DOOR_S, progress)
        except BenchError as exc:
            raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(result.to_json()))
    else:
        Console().print(render(result))
    if result.figures["lost"]:
        click.echo(f"{result.figures['lost']} events sent were not stored", err=True)
        raise SystemExit(1)
