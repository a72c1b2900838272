"""Prometheus metrics of the door agent, on a private registry, served over HTTP when ``[metrics] enabled``.

- Decisions and their per-stage latencies arrive through an event sink, as they leave the frame loop.
- Every processed frame's stage latencies (each face, and the whole frame) arrive through the agent's
  latency observer: ``facegate_device_processing_latency_seconds{stage}``.
- Frame rate, queue drops, errors, uptime, door state and versions are read from ``Agent.status()`` on
  every scrape, so they are never stale and cost nothing between scrapes.
- The MQTT runtime adds the outbox depth and the bundle sequences (absent on a standalone door).

The registry is private (never prometheus_client's global one), so several agents in one process do
not collide. Nothing here carries biometric data, person ids or names: the only labels are the stage,
the decision kind, the door state and the versions.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
    StateSetMetricFamily,
)
from prometheus_client.registry import Collector

from core.types import Decision, DecisionKind
from device.agent.sink import EventSink
from device.agent.status import UNSAFE_SETTINGS, AgentStatus
from device.config import MetricsConfig
from facegate import __version__

logger = logging.getLogger(__name__)

PREFIX = "facegate_device"
# Edge stages take from well under a millisecond (search, decide) to about a second (an int8 embed on a
# slow Pi core): half a millisecond to two seconds, roughly x2-x2.5 apart, keeps quantiles useful at
# both ends with 13 buckets per stage.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0)
# The loop's stage names (device/vision/pipeline.py, device/agent/loop.py, device/decide/decision.py);
# "total" is their sum. Unknown stage names from a future stage are observed too.
STAGES = ("detect", "align", "liveness", "embed", "search", "decide")
TOTAL_STAGE = "total"
# Per-frame histogram stages: each face's pipeline stages, and "frame" (a whole frame, faceless included).
FRAME_STAGES = ("detect", "align", "embed", "liveness", "search", "frame")
DOOR_STATES = ("locked", "unlocked", "fault")
# stop() waits this long for the HTTP thread (serve_forever polls every 0.5 s).
JOIN_TIMEOUT_S = 2.0


class MetricsError(Exception):
    """The metrics endpoint cannot be served (address in use, bad host)."""


class AgentLike(Protocol):
    """What the metrics need from the agent (``device.agent.loop.Agent``)."""

    def status(self) -> AgentStatus:
        """Current snapshot."""
        ...

    def add_sink(self, sink: EventSink) -> None:
        """Attach an event sink."""
        ...

    def add_latency_observer(self, observer: Callable[[Mapping[str, float]], None]) -> None:
        """Get every processed frame's stage latencies (ms)."""
        ...


class SnapshotsLike(Protocol):
    """``device.mqtt.snapshots.SnapshotPublisher``: best-effort face snapshots."""

    offered: int
    published: int
    dropped: int

    @property
    def depth(self) -> int:
        """Snapshots waiting to be published."""
        ...


class OutboxLike(Protocol):
    """``device.mqtt.outbox.Outbox``: events waiting for the broker."""

    @property
    def depth(self) -> int: ...
    @property
    def dropped(self) -> int: ...


class UpdaterLike(Protocol):
    """``device.bundles.updater.BundleUpdater``: the running bundle and gallery delta."""

    @property
    def running_sequence(self) -> int: ...
    @property
    def delta_sequence(self) -> int: ...


class DecisionMetricsSink:
    """The event sink that counts decisions and observes their latencies; never raises, never blocks."""

    def __init__(self, decisions: Counter, latency: Histogram) -> None:
        self._decisions = decisions
        self._latency = latency

    def emit(self, decision: Decision) -> None:
        """Count the decision by kind and observe each stage's latency (ms in, seconds out)."""
        stages = decision.latencies_ms
        for stage, ms in stages.items():
            self._latency.labels(stage).observe(max(0.0, ms) / 1000.0)
        if stages:
            self._latency.labels(TOTAL_STAGE).observe(max(0.0, sum(stages.values())) / 1000.0)
        self._decisions.labels(decision.kind.value).inc()

    def close(self) -> None:
        """Nothing to release: the registry stays scrapable until the server stops."""


class _ScrapeCollector(Collector):
    """Reads the agent's status and the MQTT side on every scrape."""

    def __init__(self, owner: DeviceMetrics) -> None:
        self._owner = owner

    def describe(self) -> Iterable[Metric]:
        """Nothing up front: the families depend on what is attached."""
        return []

    def collect(self) -> Iterable[Metric]:
        """The families of whatever sources are attached; a failing source is skipped, never the scrape."""
        owner = self._owner
        for name, build in (("agent", self._agent), ("outbox", self._outbox), ("bundles", self._bundles),
                            ("snapshots", self._snapshots)):
            try:
                yield from build(owner)
            except Exception as exc:  # a closed outbox or a reload in progress must not fail the scrape
                logger.debug("metrics source %s unavailable: %s", name, exc)

    @staticmethod
    def _agent(owner: DeviceMetrics) -> list[Metric]:
        status_of = owner.status_source
        if status_of is None:
            return []
        s = status_of()
        p = PREFIX
        door = StateSetMetricFamily(f"{p}_door_state", "Door actuator state.",
                                    {state: s.door_state == state for state in DOOR_STATES})
        versions = InfoMetricFamily(f"{p}_versions", "Software, model and gallery versions in use.", value={
            "software": owner.software_version, "model_version": s.model_version,
            "model_sha256": s.model_sha256, "gallery_version": s.gallery_version})
        liveness = InfoMetricFamily(f"{p}_liveness", "The liveness checks the door runs ('liveness off': "
                                    "none).", value={"mode": s.liveness})
        unsafe = GaugeMetricFamily(f"{p}_unsafe_setting",
                                   "1 while an unsafe setting is in force (liveness off, tau below the "
                                   "calibrated floor), explicitly configured.", labels=["setting"])
        for key in UNSAFE_SETTINGS:
            unsafe.add_metric([key], float(key in s.warnings))
        return [
            GaugeMetricFamily(f"{p}_fps", "Frames processed per second (sliding window).", value=s.fps),
            GaugeMetricFamily(f"{p}_capture_fps", "Frames captured per second (sliding window).",
                              value=s.capture_fps),
            CounterMetricFamily(f"{p}_frames_captured", "Frames read from the camera.",
                                value=s.frames_captured),
            CounterMetricFamily(f"{p}_frames_processed", "Frames through the pipeline.",
                                value=s.frames_processed),
            CounterMetricFamily(f"{p}_queue_drops", "Frames dropped because the frame queue was full.",
                                value=s.queue_drops),
            CounterMetricFamily(f"{p}_faces", "Faces analysed.", value=s.faces),
            CounterMetricFamily(f"{p}_camera_errors", "Camera failures (each followed by a retry).",
                                value=s.camera_errors),
            CounterMetricFamily(f"{p}_processing_errors", "Frames that failed in the pipeline.",
                                value=s.processing_errors),
            GaugeMetricFamily(f"{p}_camera_connected", "1 while the camera delivers frames.",
                              value=float(s.camera_connected)),
            GaugeMetricFamily(f"{p}_running", "1 while the frame loop runs.", value=float(s.running)),
            GaugeMetricFamily(f"{p}_uptime_seconds", "Seconds since the agent started.", value=s.uptime_s),
            GaugeMetricFamily(f"{p}_gallery_persons", "Persons in the active gallery.",
                              value=s.gallery_persons),
            door,
            versions,
            liveness,
            unsafe,
        ]

    @staticmethod
    def _outbox(owner: DeviceMetrics) -> list[Metric]:
        outbox = owner.outbox
        if outbox is None:
            return []
        return [
            GaugeMetricFamily(f"{PREFIX}_outbox_depth", "Events stored, not yet acked by the broker.",
                              value=outbox.depth),
            CounterMetricFamily(f"{PREFIX}_outbox_dropped", "Events evicted because the outbox was full.",
                                value=outbox.dropped),
        ]

    @staticmethod
    def _snapshots(owner: DeviceMetrics) -> list[Metric]:
        snapshots = owner.snapshots
        if snapshots is None:
            return []
        counts = CounterMetricFamily(f"{PREFIX}_snapshots", "Opt-in face snapshots by outcome.",
                                     labels=["outcome"])
        for outcome, value in (("offered", snapshots.offered), ("published", snapshots.published),
                               ("dropped", snapshots.dropped)):
            counts.add_metric([outcome], value)
        return [counts, GaugeMetricFamily(f"{PREFIX}_snapshot_queue_depth", "Snapshots waiting to be sent.",
                                          value=snapshots.depth)]

    @staticmethod
    def _bundles(owner: DeviceMetrics) -> list[Metric]:
        updater = owner.updater
        if updater is None:
            return []
        return [
            GaugeMetricFamily(f"{PREFIX}_bundle_sequence", "Sequence of the running bundle (0: none).",
                              value=updater.running_sequence),
            GaugeMetricFamily(f"{PREFIX}_gallery_delta_sequence", "Last gallery delta sequence applied.",
                              value=updater.delta_sequence),
        ]


class DeviceMetrics:
    """The agent's registry, decision sink, scrape-time sources and (optionally) its HTTP server."""

    def __init__(self, software_version: str = __version__) -> None:
        self.software_version = software_version
        self.registry = CollectorRegistry()
        decisions = Counter(f"{PREFIX}_decisions", "Decisions by kind.", ["kind"], registry=self.registry)
        latency = Histogram(f"{PREFIX}_stage_latency_seconds",
                            "Per-stage latency of the frames that led to a decision ('total': their sum).",
                            ["stage"], buckets=LATENCY_BUCKETS_S, registry=self.registry)
        for kind in DecisionKind:  # every kind exported from the start, so rate() works from zero
            decisions.labels(kind.value)
        for stage in (*STAGES, TOTAL_STAGE):
            latency.labels(stage)
        self.sink = DecisionMetricsSink(decisions, latency)
        self._processing = Histogram(f"{PREFIX}_processing_latency_seconds",
                                     "Per-stage latency of every face of every processed frame; 'frame': "
                                     "a whole frame's processing, faceless frames included.",
                                     ["stage"], buckets=LATENCY_BUCKETS_S, registry=self.registry)
        for stage in FRAME_STAGES:
            self._processing.labels(stage)
        self.status_source: Callable[[], AgentStatus] | None = None
        self.outbox: OutboxLike | None = None
        self.updater: UpdaterLike | None = None
        self.snapshots: SnapshotsLike | None = None
        self.registry.register(_ScrapeCollector(self))
        self._server: MetricsServer | None = None
        self._lock = threading.Lock()

    def observe_agent(self, agent: AgentLike) -> None:
        """Count the agent's decisions and read its status on every scrape."""
        agent.add_sink(self.sink)
        agent.add_latency_observer(self.observe_latencies)
        self.status_source = agent.status

    def observe_latencies(self, latencies: Mapping[str, float]) -> None:
        """Observe one face's (or one frame's) stage latencies, in ms."""
        for stage, ms in latencies.items():
            self._processing.labels(stage).observe(max(0.0, ms) / 1000.0)

    def observe_mqtt(self, outbox: OutboxLike, updater: UpdaterLike | None = None,
                     snapshots: SnapshotsLike | None = None) -> None:
        """Export the outbox depth and, with bundles enabled, the running bundle and delta sequences;
        with snapshots enabled, their counters."""
        self.outbox, self.updater, self.snapshots = outbox, updater, snapshots

    def scrape(self) -> bytes:
        """The Prometheus text exposition of the registry."""
        return generate_latest(self.registry)

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP endpoint (port 0: a free one); return the bound port."""
        with self._lock:
            if self._server is None:
                self._server = MetricsServer(self.registry, host, port).start()
            return self._server.port

    @property
    def port(self) -> int | None:
        """The bound port while serving, else None."""
        server = self._server
        return server.port if server is not None else None

    def close(self) -> None:
        """Stop serving (idempotent); the registry stays readable through :meth:`scrape`."""
        with self._lock:
            server, self._server = self._server, None
        if server is not None:
            server.close()


class MetricsServer:
    """prometheus_client's threaded WSGI server for one registry; ``close()`` is safe to call twice."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self.registry = registry
        self.host = host
        self.requested_port = port
        self._httpd: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    def start(self) -> MetricsServer:
        """Bind and serve on a daemon thread (raises MetricsError when the address cannot be bound)."""
        try:
            httpd, thread = start_http_server(self.requested_port, self.host, registry=self.registry)
        except OSError as exc:
            raise MetricsError(f"cannot serve metrics on {self.host}:{self.requested_port}: {exc}; "
                               f"choose another [metrics] port or host") from exc
        self._httpd, self._thread = httpd, thread
        self.port = int(httpd.server_address[1])
        logger.info("metrics on http://%s:%d/metrics", self.host, self.port)
        return self

    def close(self) -> None:
        """Stop the server thread and release the socket."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(JOIN_TIMEOUT_S)


def start_metrics(config: MetricsConfig, agent: AgentLike, metrics: DeviceMetrics | None = None
                  ) -> DeviceMetrics | None:
    """Serve the agent's metrics when ``[metrics] enabled``; return what to ``close()`` on stop.

    An address that cannot be bound is logged and the door runs on without metrics: letting people
    through matters more than being observed doing it.
    """
    if not config.enabled:
        return None
    metrics = metrics or DeviceMetrics()
    metrics.observe_agent(agent)
    try:
        metrics.serve(config.host, config.port)
    except MetricsError as exc:
        logger.error("%s; running without /metrics", exc)
        return None
    return metrics
