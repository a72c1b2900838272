"""`facegate bench kiosk`: what the door screen costs the agent, as a ratio of CPU time, on one core.

Two arms in the same run, alternated ``--repeats`` times: the real agent (``build_agent``: the int8
pipeline, the example config's liveness when the MiniFASNet files are built, else none, one interpreter
thread) pinned to one CPU core, fed the same paced 640x480 camera (people walking in, as ``facegate bench
door`` plays them, at 15 fps):

- **baseline**: the agent alone;
- **kiosk**: the agent serving ``[kiosk]`` with a screen attached: one client streaming the MJPEG preview
  at ``preview_fps = 15`` and polling ``/kiosk/state`` four times a second, as the page does.

The client runs in its own process on another core where there is one (Chromium's place on a Pi), so its
CPU is not counted; what is counted is the agent process's CPU time (every thread: capture, processing,
the kiosk's HTTP threads, JPEG encoding) from start to the end of the camera. The queue holds every frame,
so both arms process exactly the same frames and the ratio compares equal work. Reported: the median
ratio kiosk / baseline, CPU ms per processed frame in each arm, the preview rate the client received, and
the cost of one preview frame (downscale, boxes, JPEG) alone.
"""

from __future__ import annotations

import http.client
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np

from bench.door import Sequence, WalkInCamera, pin_one_core

FPS = 15.0  # the preview rate; the camera runs at it too
PREVIEW_WIDTH = 480
STATE_POLL_S = 0.25  # the page's poll interval (device/kiosk/static/kiosk.js POLL_MS)
DEFAULT_SEQUENCES = 3
DEFAULT_REPEATS = 2
ENCODE_RUNS = 200
CLIENT_START_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class Arm:
    """One run of the agent over the camera."""

    cpu_s: float
    wall_s: float
    frames: int
    preview_frames: int = 0
    states: int = 0
    preview_fps: float = 0.0  # frames the screen received per second while the preview streamed

    @property
    def cpu_ms_per_frame(self) -> float:
        """CPU ms per processed frame."""
        return 1000.0 * self.cpu_s / max(self.frames, 1)


def _client(port: int, cores: list[int], stop: Any, counts: Any, span: Any) -> None:
    """The screen: stream the preview and poll the state until ``stop`` (its own process)."""
    if cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(cores))

    def stream() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/kiosk/preview.mjpg")
        response = conn.getresponse()
        reader = response.fp
        while not stop.is_set() and reader is not None:
            line = reader.readline()
            if not line:
                return
            if line.startswith(b"Content-Length:"):
                length = int(line.split(b":")[1])
                reader.readline()
                reader.read(length)
                counts[0] += 1
                now = time.monotonic()
                if counts[0] == 1:
                    span[0] = now
                span[1] = now

    thread = threading.Thread(target=stream, daemon=True)
    thread.start()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    while not stop.is_set():
        conn.request("GET", "/kiosk/state")
        json.loads(conn.getresponse().read())
        counts[1] += 1
        stop.wait(STATE_POLL_S)
    conn.close()


def _plan(sequences: int) -> tuple[list[Sequence], str]:
    """Walk-ins of the packaged astronaut at new offsets (the door's work, not its accuracy, is measured)."""
    from skimage import data as skimage_data

    skdata: Any = skimage_data  # scikit-image's loaders are untyped
    astronaut = np.ascontiguousarray(skdata.astronaut())
    shifts = np.linspace(-80, 80, sequences)
    return [Sequence(astronaut, shift=int(s)) for s in shifts], "scikit-image astronaut walking in"


def _run_arm(models_dir: Path, plan: list[Sequence], liveness: dict[str, Any], kiosk: bool,
             core: int | None) -> Arm:
    """Play the camera through a fresh agent (with or without the kiosk and its client); measure CPU."""
    from device.agent.runner import build_agent
    from device.config import DeviceConfig
    from device.kiosk.server import start_kiosk

    with tempfile.TemporaryDirectory(prefix="facegate-bench-kiosk-") as tmp:
        config = DeviceConfig.model_validate({
            "device": {"id": "bench-kiosk", "data_dir": tmp},
            "models": {"dir": str(models_dir), "threads": 1},
            "liveness": liveness,
            "loop": {"queue_size": 1024},  # no drops: both arms process exactly the same frames
            "kiosk": {"enabled": kiosk, "port": 0, "preview_fps": FPS, "preview_width": PREVIEW_WIDTH},
        })
        camera = WalkInCamera(plan, FPS)
        agent = build_agent(config, sinks=[], source=camera)
        server = start_kiosk(agent) if kiosk else None
        if kiosk and server is None:
            raise ValueError("the kiosk could not start")
        ctx = mp.get_context("spawn")
        stop, counts, span = ctx.Event(), ctx.Array("i", 2), ctx.Array("d", 2)
        client = None
        if server is not None:
            others = sorted(set(os.sched_getaffinity(0)) - {core}) if hasattr(os, "sched_getaffinity") else []
            all_cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
            client = ctx.Process(target=_client, args=(server.port, others or all_cores, stop, counts, span),
                                 daemon=True)
            client.start()
            deadline = time.monotonic() + CLIENT_START_TIMEOUT_S
            while server.frames_sent == 0 and counts[1] == 0 and time.monotonic() < deadline:
                time.sleep(0.05)  # the client process is importing; the agent has not started yet
        try:
            cpu0, wall0 = time.process_time(), time.monotonic()
            agent.start()
            agent.wait(len(camera._plan) / FPS * 4 + 120)
            cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
            frames = agent.status().frames_processed
        finally:
            stop.set()
            if client is not None:
                client.join(10)
            agent.stop()
            if server is not None:
                server.close()
    streamed = span[1] - span[0]
    return Arm(cpu, wall, frames, counts[0], counts[1], counts[0] / streamed if streamed > 0 else 0.0)


def encode_ms(runs: int = ENCODE_RUNS) -> float:
    """Median ms of one preview frame alone: a 640x480 frame downscaled to 480 px, one box, JPEG q70."""
    from bench.door import walk_frame
    from device.kiosk.preview import encode_preview

    frame = walk_frame(np.ascontiguousarray(np.full((512, 512, 3), 128, np.uint8)), 1.0)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        encode_preview(frame, ((200.0, 120.0, 420.0, 360.0),), PREVIEW_WIDTH, 70, (235, 235, 235))
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


def run_kiosk_bench(models_dir: Path, sequences: int = DEFAULT_SEQUENCES,
                    repeats: int = DEFAULT_REPEATS, core: int | None = None) -> dict[str, Any]:
    """Alternate baseline and kiosk arms ``repeats`` times; return the ratio and the details."""
    from device.config import LivenessConfig
    from device.liveness.passive import PassiveModelError, manifest_minifasnet_files

    try:
        manifest_minifasnet_files(models_dir, LivenessConfig().passive.models)
        liveness: dict[str, Any] = {}
        liveness_text = "the example config's (passive + challenge on uncertain)"
    except PassiveModelError:
        liveness = {"required": False, "passive": {"enabled": False}, "challenge": {"mode": "never"}}
        liveness_text = "off (no MiniFASNet files in the models folder)"
    plan, source = _plan(sequences)
    pairs = []
    for _ in range(repeats):
        base = _run_arm(models_dir, plan, liveness, False, core)
        kiosk = _run_arm(models_dir, plan, liveness, True, core)
        pairs.append((base, kiosk))
    ratios = [k.cpu_s / b.cpu_s for b, k in pairs]
    base_ms = statistics.median(b.cpu_ms_per_frame for b, _ in pairs)
    kiosk_ms = statistics.median(k.cpu_ms_per_frame for _, k in pairs)
    preview_fps = statistics.median(k.preview_fps for _, k in pairs)
    return {
        "ratio": round(statistics.median(ratios), 3),
        "baseline_cpu_ms_per_frame": round(base_ms, 2),
        "kiosk_cpu_ms_per_frame": round(kiosk_ms, 2),
        "preview_fps": round(preview_fps, 1),
        "details": {
            "ratios": [round(r, 3) for r in ratios], "repeats": repeats, "camera_fps": FPS,
            "preview_fps_configured": FPS, "preview_width": PREVIEW_WIDTH,
            "frames_per_run": [b.frames for b, _ in pairs] + [k.frames for _, k in pairs],
            "processing_fps_baseline": round(statistics.median(b.frames / b.wall_s for b, _ in pairs), 1),
            "state_polls_per_s": round(statistics.median(k.states / k.wall_s for _, k in pairs), 1),
            "encode_ms_per_preview_frame": round(encode_ms(), 2),
            "liveness": liveness_text, "source": source, "core": core,
        },
    }


CONTRACT = ("ratio", "baseline_cpu_ms_per_frame", "kiosk_cpu_ms_per_frame", "preview_fps")


@click.command("kiosk")
@click.option("--models-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Built models folder (default: the `facegate models build` cache).")
@click.option("--sequences", type=click.IntRange(min=1, max=50), default=DEFAULT_SEQUENCES, show_default=True,
              help="People walking in per run (3.6 s of camera each).")
@click.option("--repeats", type=click.IntRange(min=1, max=20), default=DEFAULT_REPEATS, show_default=True,
              help="Baseline/kiosk pairs (the median ratio is reported).")
@click.option("--json", "as_json", is_flag=True,
              help='Print exactly {"ratio", "baseline_cpu_ms_per_frame", "kiosk_cpu_ms_per_frame", '
                   '"preview_fps"} on stdout.')
def kiosk(models_dir: Path | None, sequences: int, repeats: int, as_json: bool) -> None:
    """The agent's CPU time with a 15 fps kiosk preview attached over the agent alone, one core."""
    from bench.pipeline import limit_threads

    limit_threads()
    core = pin_one_core()
    from models.runtime.assets import default_models_dir
    from models.runtime.manifest import ManifestError

    try:
        result = run_kiosk_bench(models_dir or default_models_dir(), sequences, repeats, core)
    except (ManifestError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps({key: result[key] for key in CONTRACT}))
        return
    d = result["details"]
    click.echo(f"agent on CPU core {core if core is not None else 'any'}, one interpreter thread, liveness "
               f"{d['liveness']}; camera {d['camera_fps']:g} fps ({d['source']}), {repeats} pair(s)")
    click.echo(f"baseline (agent alone): {result['baseline_cpu_ms_per_frame']:.1f} CPU ms per frame, "
               f"{d['processing_fps_baseline']:.1f} frames/s processed")
    click.echo(f"kiosk (preview at up to {d['preview_fps_configured']:g} fps, {d['preview_width']} px, "
               f"state polled {d['state_polls_per_s']:.1f}/s): {result['kiosk_cpu_ms_per_frame']:.1f} CPU ms "
               f"per frame; the screen received {result['preview_fps']:.1f} preview frames/s")
    click.echo(f"kiosk / baseline CPU time = {result['ratio']:.3f}x (pairs: {d['ratios']}); one preview "
               f"frame alone {d['encode_ms_per_preview_frame']:.2f} ms")
