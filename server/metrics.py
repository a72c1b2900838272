"""Prometheus metrics of one server app, on a private registry (one per ``create_app``).

- HTTP requests and latency per route *template* (``/api/persons/{person_id}``, never the raw URL), so
  the label set stays bounded whatever clients send; unrouted requests share one label.
- Enrollments as they finish (an observer on the enrollment service).
- Audit events stored, per decision kind, from the audit subscriber's counters.
- Gauges read on every scrape: persons, devices online, deletion acks pending (database), MQTT
  connection, the newest bundle built and the gallery delta sequence published.

Only counts, kinds, route templates and sequence numbers leave here: no names, ids or biometric data.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.bundle_layout import BUNDLE_JSON
from core.types import DecisionKind
from server.bundles.delta import MqttGallerySync
from server.db.models import DeletionDevice, DeletionRequest, Device, Person
from server.enrollment.service import EnrollmentResult, Outcome
from server.state import AppState

logger = logging.getLogger(__name__)

PREFIX = "facegate_server"
# Most routes answer in milliseconds; an enrollment runs detect/align/embed on up to N images and a
# deletion may wait for device acks, so the buckets reach half a minute.
HTTP_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
UNROUTED = "<unrouted>"
# Any other method string a client sends is folded into "other" (label cardinality).
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
PENDING = "pending"


class ServerMetrics:
    """The app's registry plus the hooks that feed it."""

    def __init__(self, state: AppState) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(f"{PREFIX}_http_requests", "HTTP requests by method, route template, status.",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram(f"{PREFIX}_http_request_duration_seconds",
                                 "HTTP request latency by method and route template.", ["method", "route"],
                                 buckets=HTTP_BUCKETS_S, registry=self.registry)
        self.enrollments = Counter(f"{PREFIX}_enrollments", "Enrollments that stored at least one template.",
                                   registry=self.registry)
        self.enrollment_images = Counter(f"{PREFIX}_enrollment_images", "Enrollment images by outcome.",
                                         ["outcome"], registry=self.registry)
        for outcome in Outcome:
            self.enrollment_images.labels(outcome.value)
        self.registry.register(StateCollector(state))
        state.enrollment.observers.append(self.observe_enrollment)

    def observe_enrollment(self, result: EnrollmentResult) -> None:
        """Count one finished enrollment request and its images."""
        for image in result.images:
            self.enrollment_images.labels(image.outcome.value).inc()
        if result.accepted:
            self.enrollments.inc()

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one HTTP request."""
        method = method if method in METHODS else "other"
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    def scrape(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)


class HttpMetricsMiddleware:
    """Pure ASGI middleware: times each HTTP request and labels it with the matched route's template."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on; record method, route template, status and duration afterwards."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # an exception escaping the app becomes a 500 further out

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            # The router stores the matched route in the (shared) scope; its path is the template.
            route = getattr(scope.get("route"), "path", None) or UNROUTED
            self.metrics.observe_request(str(scope.get("method", "")), str(route), status,
                                         time.perf_counter() - started)


def latest_bundle(root: Path) -> int:
    """Sequence of the newest complete bundle folder under ``root`` (0 when none)."""
    if not root.is_dir():
        return 0
    found = [int(p.name) for p in root.iterdir()
             if p.name.isdigit() and (p / BUNDLE_JSON).is_file()]
    return max(found, default=0)


class StateCollector(Collector):
    """Families read from the app state and the database on every scrape."""

    def __init__(self, state: AppState) -> None:
        self.state = state

    def describe(self) -> Iterable[Metric]:
        """Nothing up front: reading the database at registration time is not wanted."""
        return []

    def collect(self) -> Iterable[Metric]:
        """Every family; a failing part is logged and left out, the scrape never fails."""
        for part in (self._database, self._audit, self._mqtt, self._bundles):
            try:
                yield from part()
            except Exception as exc:  # e.g. an unreadable bundles folder
                logger.warning("metrics part %s failed: %s", part.__name__, exc)

    def _database(self) -> list[Metric]:
        up = GaugeMetricFamily(f"{PREFIX}_database_up", "1 when the last scrape could read the database.")
        try:
            with self.state.db.session() as session:
                persons = session.scalar(select(func.count()).select_from(Person)) or 0
                devices = session.scalar(select(func.count()).select_from(Device)) or 0
                online = session.scalar(select(func.count()).select_from(Device)
                                        .where(Device.available == "online")) or 0
                acks = session.scalar(
                    select(func.count()).select_from(DeletionDevice).join(DeletionRequest)
                    .where(DeletionRequest.status == PENDING, DeletionDevice.state == PENDING)) or 0
                deletions = session.scalar(select(func.count()).select_from(DeletionRequest)
                                           .where(DeletionRequest.status == PENDING)) or 0
        except SQLAlchemyError as exc:
            logger.warning("metrics: database unavailable (%s)", type(exc).__name__)
            up.add_metric([], 0)
            return [up]
        up.add_metric([], 1)
        return [
            up,
            GaugeMetricFamily(f"{PREFIX}_persons", "Enrolled persons.", value=persons),
            GaugeMetricFamily(f"{PREFIX}_devices", "Devices known to the server.", value=devices),
            GaugeMetricFamily(f"{PREFIX}_devices_online", "Devices whose availability is online.",
                              value=online),
            GaugeMetricFamily(f"{PREFIX}_deletion_acks_pending",
                              "Device confirmations still awaited by pending deletions.", value=acks),
            GaugeMetricFamily(f"{PREFIX}_deletions_pending", "Deletion requests not yet confirmed.",
                              value=deletions),
        ]

    def _audit(self) -> list[Metric]:
        audit = self.state.audit
        by_kind = {kind.value: 0 for kind in DecisionKind}
        stats = audit.stats if audit is not None else None
        if stats is not None:
            by_kind.update(dict(stats.events_by_kind))  # a copy: the writer thread keeps counting
        events = CounterMetricFamily(f"{PREFIX}_audit_events", "Device events stored, by decision kind.",
                                     labels=["kind"])
        for kind, count in sorted(by_kind.items()):
            events.add_metric([kind], count)
        families: list[Metric] = [events]
        if stats is not None:
            families += [
                CounterMetricFamily(f"{PREFIX}_audit_duplicates", "Redelivered events (already stored).",
                                    value=stats.duplicates),
                CounterMetricFamily(f"{PREFIX}_audit_invalid", "Device messages refused as invalid.",
                                    value=stats.invalid),
                CounterMetricFamily(f"{PREFIX}_audit_db_errors", "Audit batches that hit a database error.",
                                    value=stats.db_errors),
            ]
        return families

    def _mqtt(self) -> list[Metric]:
        source = self.state.source
        if source is None:  # MQTT disabled (or not started)
            return []
        return [GaugeMetricFamily(f"{PREFIX}_mqtt_connected", "1 while the audit subscriber is connected.",
                                  value=float(source.connected))]

    def _bundles(self) -> list[Metric]:
        families: list[Metric] = [
            GaugeMetricFamily(f"{PREFIX}_bundle_sequence",
                              "Newest bundle built in the bundles folder (what `bundle publish` sends).",
                              value=latest_bundle(self.state.config.bundles_root))]
        sync = self.state.sync
        if isinstance(sync, MqttGallerySync):  # NullSync (MQTT off, no signing key) publishes nothing
            families.append(GaugeMetricFamily(f"{PREFIX}_gallery_delta_sequence",
                                              "Sequence of the last gallery delta published.",
                                              value=sync.ledger.seq))
        return families
