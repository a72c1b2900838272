"""``facegate device run``: build the agent from the config and run it until SIGTERM/SIGINT.

Models come from ``[models] dir`` (default: the built models folder) and the gallery from
``<data_dir>/gallery``; a missing gallery starts empty (nobody is recognised until someone is
enrolled). A standalone door reloads by itself when ``facegate device enroll`` changes the gallery.
Decisions go to a JSON-lines file (``[loop] events_jsonl``, or ``<data_dir>/events.jsonl`` for a
standalone door without MQTT) and to any extra sinks the caller passes (the MQTT publisher). With
``[metrics] enabled`` a Prometheus endpoint runs for as long as the agent does.

Fail-secure start: the door is created, and so driven locked, before anything else is opened (bundle
recovery, models, gallery, liveness, camera): a restart after a crash or a SIGKILL while the door was
unlocked comes up locked even when the models then fail to load.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

from device.agent.loop import Agent, Loader
from device.agent.sink import EventSink, JsonLinesSink, LoggingSink
from device.camera import FrameSource, create_source
from device.config import DeviceConfig
from device.door import Door, create_door
from device.gallery import Gallery
from device.gallery.store import META_NAME
from device.kiosk.server import start_kiosk
from device.liveness.base import LivenessEngine
from device.metrics import DeviceMetrics, start_metrics
from device.pipeline.frame import Models
from device.vision.embedder import EMBEDDING_DIM
from device.vision.pipeline import FacePipeline
from models.runtime.assets import default_models_dir

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED = 0, 1
# The main thread wakes this often to notice signals while waiting on the loop.
WAIT_SLICE_S = 0.2


def models_dir(config: DeviceConfig) -> Path:
    """The folder holding the active models' manifest.json."""
    return config.models.dir if config.models.dir is not None else default_models_dir()


def gallery_dir(config: DeviceConfig) -> Path:
    """The local gallery folder."""
    return config.device.data_dir / "gallery"


def open_pipeline(config: DeviceConfig, directory: Path | None = None) -> FacePipeline:
    """The face pipeline from the config's models folder (sha256-checked)."""
    return FacePipeline.from_models_dir(directory or models_dir(config), config.detector,
                                        config.models.threads, config.models.embedder)


def open_gallery(config: DeviceConfig, pipeline: FacePipeline, directory: Path | None = None) -> Gallery:
    """The gallery for this pipeline's embedder, or an empty one (raises GalleryModelMismatch)."""
    folder = directory or gallery_dir(config)
    gallery = Gallery.open_or_create(folder, EMBEDDING_DIM, pipeline.model_sha256, config.gallery,
                                     pipeline.model_version)
    if gallery.person_count == 0:
        logger.warning("gallery %s is empty: nobody will be granted until someone is enrolled", folder)
    return gallery


def default_loader(config: DeviceConfig, models: Path | None = None, gallery: Path | None = None) -> Loader:
    """A loader that opens pipeline + gallery from disk (used at start and by ``Agent.reload``)."""

    def load() -> Models:
        pipeline = open_pipeline(config, models)
        try:
            return Models(pipeline, open_gallery(config, pipeline, gallery))
        except BaseException:
            pipeline.close()
            raise

    return load


def default_sinks(config: DeviceConfig) -> list[EventSink]:
    """JSON lines where configured (always for a standalone door), else a logging sink."""
    path = config.loop.events_jsonl
    if path is None and not config.mqtt.enabled:
        path = config.device.data_dir / "events.jsonl"
    return [JsonLinesSink(path)] if path is not None else [LoggingSink()]


def open_door(config: DeviceConfig) -> Door:
    """The configured door, driven locked: the first thing a start does."""
    door = create_door(config.door)
    logger.info("door (%s) locked at start", config.door.type)
    return door


def build_agent(config: DeviceConfig, *, loader: Loader | None = None,
                sinks: Sequence[EventSink] | None = None, liveness: LivenessEngine | None = None,
                source: FrameSource | None = None, door: Door | None = None) -> Agent:
    """Lock the door, then open models, gallery, liveness and camera; return a ready (not started) agent.

    ``source`` replaces the camera the config names (the demo feeds its replay scene by scene); ``door``
    is a door the caller already locked (it stays the caller's to close when the build fails).
    """
    own_door = door is None
    door = open_door(config) if door is None else door
    load = loader or default_loader(config)
    models: Models | None = None
    try:
        models = load()
        if liveness is None and config.liveness.enabled:
            # Liveness models come from the configured models folder (MiniFASNet entries of its manifest).
            # Missing MiniFASNet files fall back to the active challenge (or stop the start, as configured),
            # never to no check.
            from device.liveness.fusion import build_liveness

            liveness = build_liveness(config.liveness, models_dir(config), config.models.threads)
        chosen = list(sinks) if sinks is not None else default_sinks(config)
        # A standalone door (no broker, our own loader) picks up `facegate device enroll` without a restart.
        watch = gallery_dir(config) / META_NAME if loader is None and not config.mqtt.enabled else None
        camera = source if source is not None else create_source(config.camera)
        return Agent(config, models=models, door=door, source=camera, sinks=chosen, liveness=liveness,
                     loader=load, watch=watch)
    except BaseException:
        closer = getattr(liveness, "close", None)
        if callable(closer):
            closer()
        if models is not None:
            models.pipeline.close()
            models.gallery.close()
        if own_door:
            door.close()
        raise


def run_agent(config: DeviceConfig, agent: Agent | None = None, metrics: DeviceMetrics | None = None,
              online: Callable[[], bool] | None = None) -> int:
    """Run until SIGTERM/SIGINT (or the end of a finite replay); return the process exit code.

    ``metrics`` (served only when ``[metrics] enabled``) lets the caller add sources or read the port;
    ``online`` (the broker connection) drives the kiosk screen's offline badge, None for a standalone door.
    """
    try:
        agent = agent or build_agent(config)
    except Exception as exc:  # models, gallery or door could not be opened: say why and exit non-zero
        logger.error("agent cannot start: %s", exc)
        return EXIT_FAILED
    served = start_metrics(config.metrics, agent, metrics)
    kiosk = start_kiosk(agent, online)  # the door screen, when [kiosk] enabled

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        logger.info("signal %s: stopping", signal.Signals(signum).name)
        agent.request_stop()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        agent.start()
        while not agent.wait(WAIT_SLICE_S):
            pass
    finally:
        agent.stop()
        if kiosk is not None:
            kiosk.close()
        if served is not None:
            served.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    error = agent.status().error
    if error:
        logger.error("agent stopped on an error: %s", error)
        return EXIT_FAILED
    return EXIT_OK
