"""Best-effort publisher of opt-in event snapshots (wire format: :mod:`core.protocol.snapshots`).

``offer`` runs on the frame loop's thread and never blocks: it frames the JPEG and hands it to a bounded
in-memory queue with ``put_nowait``; when the queue is full the snapshot is dropped, counted and logged
by event id. A worker thread publishes each one with QoS 1 on ``…/<device>/snapshot`` (the event id as
MQTT 5 correlation data), waiting for a connection for at most ``max_age_s``. Snapshots are not
persisted: a restart or a long outage loses them, while their events stay safe in the outbox.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from types import TracebackType

from core.mqtt.client import MqttClient
from core.protocol.schemas import EventPayload
from core.protocol.snapshots import encode_snapshot_frame, make_header
from core.protocol.topics import Topics
from models.face.image import image_size

logger = logging.getLogger(__name__)

# Snapshots held in memory (~10-20 KB each): a burst of strangers fits, a day offline does not.
SNAPSHOT_QUEUE = 16
# A snapshot still unsent after this long (broker away) is dropped: it is context, not the record.
SNAPSHOT_MAX_AGE_S = 60.0
# The worker wakes this often to notice close() and connection changes.
POLL_S = 0.2


@dataclass(frozen=True, slots=True)
class _Pending:
    event_id: str
    frame: bytes
    queued_at: float


class SnapshotPublisher:
    """Publishes framed snapshots from a bounded queue on its own thread; ``close()`` is idempotent."""

    def __init__(self, client: MqttClient, topics: Topics, device_id: str, *,
                 queue_size: int = SNAPSHOT_QUEUE, max_age_s: float = SNAPSHOT_MAX_AGE_S) -> None:
        self.client = client
        self.topic = topics.snapshot(device_id)
        self.device_id = device_id
        self.max_age_s = max_age_s
        self.offered = 0
        self.published = 0
        self.dropped = 0
        self._count_lock = threading.Lock()  # offer() and the worker both count drops
        self._queue: queue.Queue[_Pending] = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="mqtt-snapshots", daemon=True)
        self._thread.start()

    def offer(self, event: EventPayload, jpeg: bytes) -> bool:
        """Queue the snapshot of ``event``; False (dropped and counted) when it cannot be queued."""
        event_id = str(event.event_id)
        if self._closed:
            return self._drop(event_id, "publisher closed")
        try:
            height, width = image_size(jpeg)
            header = make_header(event_id, event.ts, event.device, event.decision, jpeg, width, height)
            frame = encode_snapshot_frame(header, jpeg)
        except Exception as exc:  # a bad image must not cost the event: say so and go on without it
            return self._drop(event_id, f"not a valid snapshot ({type(exc).__name__})")
        try:
            self._queue.put_nowait(_Pending(event_id, frame, time.monotonic()))
        except queue.Full:
            return self._drop(event_id, f"queue full ({self._queue.maxsize})")
        with self._count_lock:
            self.offered += 1
        return True

    def _drop(self, event_id: str, why: str) -> bool:
        with self._count_lock:
            self.dropped += 1
            total = self.dropped
        logger.warning("snapshot of event %s dropped: %s (%d dropped so far)", event_id, why, total)
        return False

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._queue.get(timeout=POLL_S)
            except queue.Empty:
                continue
            try:
                self._publish(item)
            except Exception as exc:  # the worker must survive anything one publish does
                self._drop(item.event_id, f"publish failed ({type(exc).__name__})")

    def _publish(self, item: _Pending) -> None:
        while not self.client.connected:
            if self._stop.is_set():
                self._drop(item.event_id, "device stopping")
                return
            if time.monotonic() - item.queued_at > self.max_age_s:
                self._drop(item.event_id, f"broker away for more than {self.max_age_s:.0f} s")
                return
            self.client.wait_connected(POLL_S)
        handle = self.client.publish(self.topic, item.frame, qos=1,
                                     correlation_data=item.event_id.encode("ascii"))
        if handle.queued:
            with self._count_lock:
                self.published += 1
        else:
            self._drop(item.event_id, "the client refused the publish")

    @property
    def depth(self) -> int:
        """Snapshots waiting to be published."""
        return self._queue.qsize()

    def close(self) -> None:
        """Stop the worker (safe to call twice); queued snapshots are dropped (best-effort by design)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            self._drop(item.event_id, "device stopping")

    def __enter__(self) -> SnapshotPublisher:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
