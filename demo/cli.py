"""``facegate demo``: the whole system on one machine, without a camera or a broker installed.

Exit status 0 only when every scripted scene passed (with ``--camera``, when everything started).
Detailed logs go to ``<work>/demo.log`` unless ``--log-level`` was given; ``--json-summary`` writes the
machine-readable outcome.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

import click
from click.core import ParameterSource
from rich.console import Console

from demo.report import Summary
from demo.run import ADMIN, DEVICE_ID, PREFIX, SITE, Demo, Options
from demo.stack import DemoError

logger = logging.getLogger(__name__)

PASSWORD_ENV = "FACEGATE_SERVER__AUTH__BOOTSTRAP_PASSWORD"  # noqa: S105 - the variable's name, not a secret
LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
# Console width when stdout is not a terminal (make, CI logs): wide enough for the summary table.
PIPE_WIDTH = 120


def _work_dir(keep_data: Path | None) -> Path:
    if keep_data is None:
        return Path(tempfile.mkdtemp(prefix="facegate-demo-"))
    if keep_data.exists() and any(keep_data.iterdir()):
        raise click.BadParameter(f"{keep_data} is not empty; give a new or empty folder",
                                 param_hint="--keep-data")
    keep_data.mkdir(parents=True, exist_ok=True)
    return keep_data


def _log_to_file(ctx: click.Context, work: Path) -> logging.Handler | None:
    """Unless --log-level was given: every record to <work>/demo.log, only errors on the console."""
    if ctx.find_root().get_parameter_source("log_level") is not ParameterSource.DEFAULT:
        return None
    root = logging.getLogger()
    for handler in root.handlers:
        handler.setLevel(logging.ERROR)  # the demo narrates; the expected warnings stay in the file
    file_handler = logging.FileHandler(work / "demo.log", encoding="utf-8")
    file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(file_handler)
    return file_handler


def _interrupt(_signum: int, _frame: FrameType | None) -> None:
    """SIGTERM ends the demo like Ctrl-C does, so the broker and the temp folder are cleaned up."""
    raise KeyboardInterrupt


def _serve(console: Console, demo: Demo, opts: Options, live: bool) -> None:
    """Keep everything up, say how to reach it, until Ctrl-C."""
    assert demo.server is not None  # noqa: S101 - only called after a successful start
    console.print(f"\n[bold]web station[/] {demo.server.url}/  user [bold]{ADMIN}[/]  password "
                  f"[bold]{opts.password}[/]")
    console.print(f"events on MQTT topic {PREFIX}/{SITE}/+/events; data in {opts.work}")
    if demo.door is not None and demo.door.kiosk is not None:
        console.print(f"door screen (open it in a browser on this machine) {demo.door.kiosk.url}")
    if live:
        console.print(f"{DEVICE_ID} watches camera {opts.camera}: enroll yourself at the web station "
                      "(webcam or upload), then look at the camera; events print here")
    console.print("Ctrl-C stops the door, the server and the broker")
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        console.print("stopping")


@click.command("demo")
@click.option("--json-summary", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Also write the outcome as JSON here (steps, decisions, scores, pass/fail).")
@click.option("--keep-running", is_flag=True,
              help="After the scenes, leave server, door and broker up (web UI URL printed) until Ctrl-C.")
@click.option("--keep-data", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Work in this new or empty folder and keep it (database, bundles, log); default: a temp "
                   "folder that is removed.")
@click.option("--camera", default=None, metavar="SOURCE",
              help="Watch a real camera (OpenCV index such as 0, or a URL) instead of the replay; no "
                   "scripted scenes, events print until Ctrl-C.")
@click.option("--screenshots", type=click.Path(path_type=Path, file_okay=False),
              default=Path("artifacts/screenshots/demo"), show_default=True,
              help="Where the door screen's screenshots go (one per state it showed; headless Chromium).")
@click.pass_context
def cli(ctx: click.Context, json_summary: Path | None, keep_running: bool, keep_data: Path | None,
        camera: str | None, screenshots: Path) -> None:
    """Run broker, server, enrollment, a signed bundle and a door end to end, and play scripted scenes.

    Scenes: an enrolled person is granted, a stranger is unknown, a printed photo is spoof (when the
    liveness data in ../shared is present), and a deleted person is no longer granted once the door
    confirmed the deletion. Prints each event as an MQTT subscriber receives it and a summary table.
    """
    console = Console(highlight=False, width=None if sys.stdout.isatty() else PIPE_WIDTH)
    work = _work_dir(keep_data)
    log_handler = _log_to_file(ctx, work)
    password = os.environ.get(PASSWORD_ENV) or secrets.token_urlsafe(12)
    opts = Options(work, password, camera, screenshots)
    summary = Summary(image_set="", notes=[], broker="", live=camera is not None)
    demo = Demo(console, opts, summary)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        try:
            cast, ids, events = demo.start()
            if camera is None:
                demo.scenes(cast, ids, events)
            else:
                demo.live()
        except DemoError as exc:
            summary.error = str(exc)
        except KeyboardInterrupt:
            summary.error = "interrupted"
        except Exception as exc:  # any failure ends the demo with its reason in the summary, not a traceback
            logger.exception("demo failed")
            summary.error = f"{type(exc).__name__}: {exc}"
        demo.watch_end()
        summary.print(console)
        if json_summary is not None:
            summary.write_json(json_summary)
        if (keep_running or camera is not None) and not summary.error:
            _serve(console, demo, opts, live=camera is not None)
    finally:
        demo.close()
        signal.signal(signal.SIGTERM, previous)
        if log_handler is not None:
            logging.getLogger().removeHandler(log_handler)
            log_handler.close()
        if keep_data is None:
            shutil.rmtree(work, ignore_errors=True)
        else:
            console.print(f"data kept in {work}" + (f" (log: {work / 'demo.log'})" if log_handler else ""))
    sys.exit(0 if summary.passed else 1)
