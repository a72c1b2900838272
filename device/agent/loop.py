"""The frame loop: capture thread -> bounded queue -> processing thread -> door and event sink.

The capture thread owns the camera: it opens it, reads and paces frames, and hands them over with
``put_nowait`` into a bounded queue, dropping the oldest (or the newest) frame when full and counting it.
When the camera fails it counts the error, locks the door, closes the source and retries with the
source's exponential backoff until the camera is back. The processing thread owns the tracker, the
track fusion and the decision engine: analyze (detect, align, embed) -> liveness -> track fusion
(``device.decide.fusion``: the mean of the track's best frames when ``decision.fuse_frames`` > 1) ->
gallery search -> decide (recognition, then the ``[access]`` policy) -> door -> sink. Only when a sink
asks for snapshots does an unknown/spoof decision carry a JPEG of the face region (``Decision.snapshot``).
Observers (the metrics, the kiosk screen) see each processed frame: its latencies, and its faces with
their tracks, boxes, chips and liveness (``add_frame_observer``), on the processing thread.
Both stop on one ``threading.Event``; ``stop()`` joins them with a timeout (shutdown well under 2 s).

Fail-secure: an exception while processing a frame (pipeline, liveness, gallery) locks the door; a grant
the door cannot carry out becomes ``denied`` with reason ``door_fault``, and a door that enters ``fault``
is a ``door_fault`` event. Every opening is an event: a manual unlock (MQTT, Home Assistant, CLI) goes
through the sinks (the outbox) as ``manual_unlock`` with who asked. A door without a liveness engine does
not start unless ``[liveness] required = false``; a ``tau`` below the calibrated floor for the live
gallery's size is refused at start and reload unless acknowledged. Both then show in ``warnings``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from types import TracebackType

from core.protocol.snapshots import SNAPSHOT_KINDS
from core.types import Decision, DecisionKind, Detection, Frame, LivenessResult
from device.agent.sink import EventSink, FanOutSink
from device.agent.status import LIVENESS_OFF_KEY, LOW_TAU_KEY, AgentStatus, Counters, RateMeter
from device.camera import CameraSetupError, FrameSource
from device.config import DeviceConfig
from device.decide.operating_point import low_tau_warning
from device.door import Door, DoorError, DoorState, Transition
from device.gallery import Gallery
from device.liveness.base import LIVENESS_OFF, LivenessEngine, PassThroughLiveness
from device.pipeline.frame import FaceView, FramePipeline, LatencyObserver, Models
from device.vision.snapshot import encode_snapshot

logger = logging.getLogger(__name__)

# How often idle threads wake up to look at the stop event and expire tracks.
POLL_S = 0.1
# How often a standalone door looks for a gallery changed on disk by `facegate device enroll`.
WATCH_INTERVAL_S = 2.0
# Threads get this long to finish the frame in hand on stop(); the whole shutdown stays under 2 s.
JOIN_TIMEOUT_S = 1.5
# The reason a grant carries when the door could not open for it (a ``denied`` event).
DOOR_FAULT_REASON = "door_fault"


class AgentError(Exception):
    """The agent cannot start or reload."""


def tau_warning(config: DeviceConfig, gallery: Gallery) -> str | None:
    """The acknowledged low-tau warning for this gallery, or None; AgentError when it is not acknowledged."""
    warning = low_tau_warning(config.decision.tau, gallery.person_count)
    if warning is None:
        return None
    if not config.decision.acknowledge_low_tau:
        raise AgentError(f"{warning}; raise [decision] tau or set decision.acknowledge_low_tau = true")
    return f"{warning} (acknowledged)"


Loader = Callable[[], Models]
FrameObserver = Callable[[Frame, Sequence[FaceView]], None]
# The latency key an observer gets once per processed frame: the whole frame's processing time.
FRAME_STAGE = "frame"


class Agent:
    """The kiosk agent; a context manager. Public API for the MQTT layer: status, manual_unlock, reload."""

    def __init__(self, config: DeviceConfig, *, models: Models, door: Door, source: FrameSource,
                 sinks: Sequence[EventSink] = (), liveness: LivenessEngine | None = None,
                 loader: Loader | None = None, watch: Path | None = None) -> None:
        if models.gallery.model_sha256 != models.pipeline.model_sha256:
            raise AgentError("gallery and embedder differ (sha256); load the gallery for this model")
        if liveness is None and config.liveness.required:
            raise AgentError("[liveness] is required but no liveness engine was given; build it with "
                             "device.liveness.fusion.build_liveness, or set [liveness] required = false")
        self._tau_warning = tau_warning(config, models.gallery)
        self.config = config
        self._models = models
        self._loader = loader
        self._watch = watch
        self._watch_stamp = self._stamp()
        self._watch_next = 0.0
        self.door = door
        self.source = source
        self.sink = FanOutSink(*sinks)
        self.liveness: LivenessEngine = liveness if liveness is not None else PassThroughLiveness()
        self._emit_lock = threading.Lock()  # the frame loop, the command thread and the door timer all emit
        door.add_listener(self._on_door_transition)
        self._queue: queue.Queue[Frame] = queue.Queue(maxsize=config.loop.queue_size)
        self._stop = threading.Event()
        self._capture_done = threading.Event()
        self._finished = threading.Event()
        self._models_lock = threading.RLock()
        self._camera_epoch = 0
        self._camera_connected = False
        self._counters = Counters()
        self._fps = RateMeter()
        self._capture_fps = RateMeter()
        self._last_decision: Decision | None = None
        self._error: str | None = None
        self._started_at: float | None = None
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._latency_observers: list[LatencyObserver] = []
        self._frame_observers: list[FrameObserver] = []

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the capture and processing threads."""
        if self._threads:
            raise AgentError("agent already started")
        self._started_at = time.monotonic()
        self._threads = [
            threading.Thread(target=self._capture_loop, name="capture", daemon=True),
            threading.Thread(target=self._process_loop, name="process", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        logger.info("agent %s started (gallery %s, %d persons)", self.config.device.id,
                    self._models.gallery.version, self._models.gallery.person_count)

    def request_stop(self) -> None:
        """Ask both threads to stop (safe from a signal handler)."""
        self._stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the loop ends (stop requested, or a finite source fully processed)."""
        return self._finished.wait(timeout)

    def stop(self, timeout: float = JOIN_TIMEOUT_S) -> None:
        """Stop the threads, lock the door and release everything (idempotent)."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                logger.warning("thread %s did not stop within %.1f s", thread.name, timeout)
        self.close()

    def close(self) -> None:
        """Release camera, door (locked), sinks and models; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._finished.set()
        self.door.close()
        self.source.close()
        self.sink.close()
        with self._models_lock:
            self._models.pipeline.close()
            self._models.gallery.close()
        closer = getattr(self.liveness, "close", None)  # FusedLiveness holds interpreters; pass-through none
        if callable(closer):
            closer()

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # ------------------------------------------------------------------ public API
    @property
    def gallery(self) -> Gallery:
        """The active gallery (thread-safe: apply add/remove deltas in place, then ``save()``)."""
        return self._models.gallery

    def add_sink(self, sink: EventSink) -> None:
        """Attach another event sink (the MQTT publisher)."""
        self.sink.add(sink)

    def add_latency_observer(self, observer: LatencyObserver) -> None:
        """Call ``observer`` with the stage latencies (ms) of every face of every processed frame, and with
        ``{"frame": ms}`` once per frame (faceless frames included). Observers must be quick; an observer
        that raises is logged and never stops the door."""
        self._latency_observers.append(observer)

    def add_frame_observer(self, observer: FrameObserver) -> None:
        """Call ``observer`` on the processing thread with every processed frame and its faces (track,
        box, chip, liveness), after the frame's decisions went to the sinks (the kiosk's preview and
        hints). It must be quick and must not keep the images beyond the local screen; one that raises is
        logged and never stops the door."""
        self._frame_observers.append(observer)

    def _observe_latencies(self, latencies: Mapping[str, float]) -> None:
        for observer in self._latency_observers:
            try:
                observer(latencies)
            except Exception:
                logger.exception("latency observer failed")

    @property
    def liveness_mode(self) -> str:
        """What liveness the door runs ("passive + challenge on uncertain", "liveness off", ...)."""
        return str(getattr(self.liveness, "mode", "custom"))

    @property
    def warnings(self) -> dict[str, str]:
        """Unsafe settings in force by key (``liveness_off``, ``low_tau``) with their text, for status,
        metrics, doctor and Home Assistant (empty when none)."""
        out = {}
        if self.liveness_mode == LIVENESS_OFF or not self.config.liveness.enabled:
            out[LIVENESS_OFF_KEY] = LIVENESS_OFF
        if self._tau_warning is not None:
            out[LOW_TAU_KEY] = self._tau_warning
        return out

    def _emit(self, decision: Decision) -> None:
        with self._emit_lock:
            self.sink.emit(decision)

    def manual_unlock(self, seconds: float | None = None, *, requested_by: str = "",
                      correlation_id: str = "") -> float:
        """Operator unlock (MQTT, Home Assistant, CLI): open the door, then put a ``manual_unlock`` event
        with who asked through the sinks (the outbox). Returns the seconds opened; DoorError when refused."""
        who = requested_by or "unknown"
        opened = self.door.manual_unlock(seconds, reason=f"manual unlock by {who}")
        decision = Decision(kind=DecisionKind.MANUAL_UNLOCK, person_id=None, name=None, score=0.0, margin=0.0,
                            liveness=LivenessResult.skipped(),
                            model_version=self._models.pipeline.model_version,
                            gallery_version=self._models.gallery.version, timestamp=time.time(),
                            source_id=self.source.source_id, requested_by=who,
                            correlation_id=correlation_id, seconds=opened)
        logger.info("manual unlock for %.1f s requested by %s (%s)", opened, who, correlation_id or "-")
        self._count(decision)
        self._emit(decision)
        return opened

    def _on_door_transition(self, transition: Transition) -> None:
        """A door that enters fault is on record: a ``door_fault`` event (called under the door's lock)."""
        if transition.state is not DoorState.FAULT:
            return
        decision = Decision(kind=DecisionKind.DOOR_FAULT, person_id=None, name=None, score=0.0, margin=0.0,
                            liveness=LivenessResult.skipped(), timestamp=transition.wall_time,
                            source_id=self.source.source_id, reason=transition.reason[:256])
        self._count(decision)
        try:
            self._emit(decision)
        except Exception:
            logger.exception("door fault event could not be recorded")

    def remove_persons(self, person_ids: Sequence[str]) -> list[str]:
        """Remove persons from the live gallery in place (a deletion); return those still present (none
        unless the removal failed). The next frame already searches without them."""
        with self._models_lock:
            gallery = self._models.gallery
            for person_id in person_ids:
                if person_id in gallery:
                    gallery.remove_person(person_id)
            return [person_id for person_id in person_ids if person_id in gallery]

    def reload(self) -> str:
        """Re-open models and gallery from disk (after a bundle install); return the new gallery version.

        The new pair is loaded beside the running one and swapped between two frames; if loading fails
        the running pair stays and ``AgentError`` is raised.
        """
        if self._loader is None:
            raise AgentError("this agent has no loader to reload from")
        try:
            new = self._loader()
        except Exception as exc:  # any load failure keeps the running models
            raise AgentError(f"reload failed, keeping the running models: {exc}") from exc
        if new.gallery.model_sha256 != new.pipeline.model_sha256:
            new.pipeline.close()
            new.gallery.close()
            raise AgentError("reload failed: the new gallery was built for another embedder")
        try:
            warning = tau_warning(self.config, new.gallery)
        except AgentError as exc:
            new.pipeline.close()
            new.gallery.close()
            raise AgentError(f"reload refused, keeping the running models: {exc}") from exc
        with self._models_lock:
            old, self._models = self._models, new
            self._tau_warning = warning
        old.pipeline.close()
        old.gallery.close()
        logger.info("reloaded: model %s, gallery %s", new.pipeline.model_version, new.gallery.version)
        return new.gallery.version

    def status(self) -> AgentStatus:
        """Snapshot for the status topic."""
        c = self._counters
        models = self._models
        try:
            gallery_version, persons = models.gallery.version, models.gallery.person_count
        except Exception:  # a gallery closed by a concurrent reload; report what we can
            gallery_version, persons = "", 0
        return AgentStatus(
            device_id=self.config.device.id,
            running=bool(self._threads) and not self._finished.is_set(),
            uptime_s=time.monotonic() - self._started_at if self._started_at else 0.0,
            fps=self._fps.rate(),
            capture_fps=self._capture_fps.rate(),
            frames_captured=c.frames_captured,
            frames_processed=c.frames_processed,
            queue_drops=c.queue_drops,
            bad_frames=self.source.bad_frames,
            camera_errors=c.camera_errors,
            camera_connected=self._camera_connected,
            processing_errors=c.processing_errors,
            faces=c.faces,
            decisions=dict(c.decisions),
            last_decision=self._last_decision,
            model_version=models.pipeline.model_version,
            model_sha256=models.pipeline.model_sha256,
            gallery_version=gallery_version,
            gallery_persons=persons,
            door_state=self.door.state.value,
            error=self._error,
            liveness=self.liveness_mode,
            warnings=self.warnings,
        )

    def _stamp(self) -> int | None:
        """Modification time of the watched file (None when absent or not watching)."""
        if self._watch is None:
            return None
        try:
            return self._watch.stat().st_mtime_ns
        except OSError:
            return None

    def _check_watch(self) -> None:
        """Reload when the watched gallery file changed on disk (standalone enrollment)."""
        now = time.monotonic()
        if self._watch is None or self._loader is None or now < self._watch_next:
            return
        self._watch_next = now + WATCH_INTERVAL_S
        stamp = self._stamp()
        if stamp == self._watch_stamp:
            return
        self._watch_stamp = stamp
        logger.info("%s changed on disk: reloading", self._watch)
        try:
            self.reload()
        except AgentError as exc:
            logger.error("%s", exc)

    # ------------------------------------------------------------------ capture thread
    def _camera_lost(self, exc: BaseException) -> None:
        self._counters.camera_errors += 1
        self._camera_connected = False
        self._camera_epoch += 1
        self.source.close()
        try:
            self.door.lock("camera lost")
        except DoorError as door_exc:
            self._counters.door_errors += 1
            logger.error("cannot lock the door after a camera failure: %s", door_exc)
        delay = self.source.backoff.next_delay()
        logger.warning("camera %s failed (%s: %s); retrying in %.1f s", self.source.source_id,
                       type(exc).__name__, exc, delay)
        self._stop.wait(delay)

    def _enqueue(self, frame: Frame) -> None:
        try:
            self._queue.put_nowait(frame)
            return
        except queue.Full:
            self._counters.queue_drops += 1
        if self.config.loop.drop == "newest":
            return
        try:
            self._queue.get_nowait()  # drop the oldest, keep the freshest view of the door
        except queue.Empty:
            pass
        try:
            self._queue.put_nowait(frame)
        except queue.Full:
            self._counters.queue_drops += 1

    def _capture_loop(self) -> None:
        opened = False
        next_due = time.monotonic()
        try:
            while not self._stop.is_set():
                try:
                    if not opened:
                        self.source.open()
                        opened, self._camera_connected = True, True
                        next_due = time.monotonic()
                    frame = self.source.read()
                except CameraSetupError as exc:
                    self._error = str(exc)
                    logger.error("camera cannot work as configured: %s", exc)
                    self._stop.set()
                    break
                except Exception as exc:  # CameraError or anything a backend raises: retry, door locked
                    opened = False
                    self._camera_lost(exc)
                    continue
                if frame is None:
                    logger.info("camera %s reached the end of its stream", self.source.source_id)
                    break
                self.source.backoff.reset()
                self._counters.frames_captured += 1
                self._capture_fps.tick()
                self._enqueue(frame)
                interval = self.source.frame_interval_s
                if interval:
                    next_due = max(next_due + interval, time.monotonic() - interval)
                    self._stop.wait(max(0.0, next_due - time.monotonic()))
        finally:
            self._capture_done.set()

    # ------------------------------------------------------------------ processing thread
    def _process_loop(self) -> None:
        frames = FramePipeline(self.config, self.liveness)  # owned by this thread
        epoch = self._camera_epoch
        try:
            while not self._stop.is_set():
                self._check_watch()
                try:
                    frame = self._queue.get(timeout=POLL_S)
                except queue.Empty:
                    if self._capture_done.is_set():
                        break
                    frames.expire(time.monotonic())
                    continue
                if epoch != self._camera_epoch:  # the camera dropped: whoever was there is gone
                    epoch = self._camera_epoch
                    frames.clear()
                try:
                    with self._models_lock:
                        self._process(frame, frames)
                except Exception:  # one bad frame must never stop the door, and never leave it open
                    self._counters.processing_errors += 1
                    logger.exception("frame %d could not be processed", frame.index)
                    self._lock_on_error("processing error")
        finally:
            self._finished.set()

    def _lock_on_error(self, reason: str) -> None:
        """Fail-secure: lock the door after an error (a lock that fails leaves it in fault)."""
        try:
            self.door.lock(reason)
        except DoorError as exc:
            self._counters.door_errors += 1
            logger.error("cannot lock the door after an error: %s", exc)

    def _process(self, frame: Frame, frames: FramePipeline) -> None:
        started = time.perf_counter()
        models = self._models
        faces = frames.analyze(frame, models)
        self._counters.frames_processed += 1
        self._fps.tick()
        self._counters.faces += len(faces)
        result = frames.decide(frame, models, faces)
        if self._latency_observers:
            for latencies in result.latencies:
                self._observe_latencies(latencies)
        for made in result.decisions:
            decision = made.decision
            snapshot = (self._snapshot(frame, made.detection)
                        if decision.kind in SNAPSHOT_KINDS and self.sink.wants_snapshots else None)
            self._act(replace(decision, snapshot=snapshot) if snapshot is not None else decision)
        for observer in self._frame_observers:
            try:
                observer(frame, result.views)
            except Exception:
                logger.exception("frame observer failed")
        if self._latency_observers:
            self._observe_latencies({FRAME_STAGE: (time.perf_counter() - started) * 1000.0})

    def _snapshot(self, frame: Frame, detection: Detection) -> bytes | None:
        """JPEG of the face region for an opted-in sink, or None (a failed snapshot never costs the event)."""
        try:
            return encode_snapshot(frame.rgb, detection.box)
        except Exception as exc:
            logger.warning("snapshot of frame %d could not be made (%s); event sent without it", frame.index,
                           type(exc).__name__)
            return None

    def _count(self, decision: Decision) -> None:
        self._last_decision = decision
        counts = self._counters.decisions
        counts[decision.kind.value] = counts.get(decision.kind.value, 0) + 1

    def _act(self, decision: Decision) -> None:
        if decision.kind is DecisionKind.GRANTED:
            try:
                self.door.grant(reason=f"granted {decision.person_id}")
            except DoorError as exc:  # no grant: the event says the recognised person was not let in
                self._counters.door_errors += 1
                logger.error("door did not open for a grant: %s", exc)
                decision = replace(decision, kind=DecisionKind.DENIED, reason=DOOR_FAULT_REASON)
        self._count(decision)
        self._emit(decision)
