"""The audit subscriber: every device event stored exactly once, plus availability, status and acks.

paho's network thread only enqueues. One writer thread owns the database work: it drains the queue
in batches, writes each batch in one transaction and acknowledges the messages to the broker only
after the commit (at-least-once delivery; the unique event id turns it into exactly-once storage).
After the commit it also hands the stored event seqs to ``on_events_stored``, which sends each door
its receipt (``…/<device>/events/confirm``): the door keeps an event until then, so a broker that
restarts without persistence cannot lose it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from core.protocol.schemas import BundleAck
from core.protocol.topics import Topics
from server.audit.store import BatchResult, InvalidMessageError, Parsed, apply_batch, parse
from server.audit.transport import Delivery
from server.db.session import Database

logger = logging.getLogger(__name__)

QUEUE_MAX = 50_000  # far above the broker's in-flight window, so a put only blocks when the DB stalls
BATCH_MAX = 500  # messages per transaction: bounds latency and SQLite lock time
LINGER_S = 0.02  # wait this long for more messages to fill a batch (trade latency for fewer commits)
POLL_S = 0.2  # how often an idle writer checks for stop
RETRY_MAX_S = 5.0  # backoff cap while the database is unavailable
PUT_TIMEOUT_S = 1.0


@dataclass(slots=True)
class AuditStats:
    """Counters since start."""

    received: int = 0
    inserted: int = 0
    duplicates: int = 0
    invalid: int = 0
    ignored: int = 0
    batches: int = 0
    db_errors: int = 0
    events_by_kind: dict[str, int] = field(default_factory=dict)  # inserted events per decision kind

    def count_kinds(self, kinds: dict[str, int]) -> None:
        """Add one batch's inserted events per kind."""
        for kind, count in kinds.items():
            self.events_by_kind[kind] = self.events_by_kind.get(kind, 0) + count


class AuditSubscriber:
    """Feed :meth:`handle` from a transport; :meth:`start` runs the writer; :meth:`close` is idempotent."""

    def __init__(self, db: Database, topics: Topics,
                 on_delta_acks: Callable[[Session, set[str]], int] | None = None,
                 after_commit: Callable[[], None] | None = None, batch_max: int = BATCH_MAX,
                 linger_s: float = LINGER_S,
                 on_running_bundles: Callable[[set[str]], None] | None = None,
                 on_events_stored: Callable[[dict[str, list[int]]], None] | None = None,
                 on_door_keys: Callable[[dict[str, str]], object] | None = None) -> None:
        if batch_max < 1 or linger_s < 0:
            raise ValueError("batch_max must be >= 1 and linger_s >= 0")
        self.batch_max = batch_max
        self.linger_s = linger_s
        self.db = db
        self.topics = topics
        self.stats = AuditStats()
        self._on_delta_acks = on_delta_acks
        self._after_commit = after_commit
        self._on_running_bundles = on_running_bundles
        self._on_events_stored = on_events_stored
        self._on_door_keys = on_door_keys
        self._queue: queue.Queue[Delivery] = queue.Queue(maxsize=QUEUE_MAX)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def filters(self) -> list[str]:
        """Topic filters to subscribe to."""
        t = self.topics
        return [t.all_events, t.all_available, t.all_status, t.all_bundle_acks]

    def handle(self, delivery: Delivery) -> None:
        """Enqueue a delivery (network thread); blocks only while the writer is far behind."""
        while not self._stop.is_set():
            try:
                self._queue.put(delivery, timeout=PUT_TIMEOUT_S)
                return
            except queue.Full:
                logger.warning("audit queue full (%d); the database is not keeping up", QUEUE_MAX)
        # Stopping: leave the message unacknowledged so the broker redelivers it next time.

    def start(self) -> AuditSubscriber:
        """Start the writer thread."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
                self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Stop the writer after the current batch (safe to call twice)."""
        self._stop.set()
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)

    def __enter__(self) -> AuditSubscriber:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _next_batch(self) -> list[Delivery]:
        try:
            first = self._queue.get(timeout=POLL_S)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + self.linger_s
        while len(batch) < self.batch_max:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            batch.append(item)
        return batch

    def _run(self) -> None:
        while not self._stop.is_set():
            batch = self._next_batch()
            if batch:
                self._process(batch)
        logger.info("audit writer stopped: %s", self.stats)

    def _parse(self, batch: list[Delivery]) -> list[Parsed]:
        parsed: list[Parsed] = []
        for delivery in batch:
            try:
                msg = parse(self.topics, delivery.topic, delivery.payload)
            except InvalidMessageError as exc:
                self.stats.invalid += 1
                logger.warning("invalid message on %s: %s", delivery.topic, exc)
                continue
            if msg is None:
                self.stats.ignored += 1
            else:
                parsed.append(msg)
        return parsed

    def _store(self, parsed: list[Parsed]) -> BatchResult:
        with self.db.transaction() as session:
            result = apply_batch(session, parsed)
            if result.delta_devices and self._on_delta_acks is not None:
                self._on_delta_acks(session, result.delta_devices)
        return result

    def _store_one_by_one(self, parsed: list[Parsed]) -> BatchResult:
        """Isolate a message that breaks the batch (a bug, not bad input: that is caught by parse)."""
        total = BatchResult()
        for msg in parsed:
            try:
                one = self._store([msg])
            except SQLAlchemyError:
                raise
            except Exception as exc:
                self.stats.invalid += 1
                logger.error("message from %s could not be stored (%s); dropped", msg.device_id,
                             type(exc).__name__)
                continue
            total.merge(one)
        return total

    def _process(self, batch: list[Delivery]) -> None:
        self.stats.received += len(batch)
        parsed = self._parse(batch)
        delay = 0.1
        while True:
            try:
                try:
                    result = self._store(parsed)
                except SQLAlchemyError:
                    raise
                except Exception:
                    logger.exception("audit batch failed; storing its messages one by one")
                    result = self._store_one_by_one(parsed)
                break
            except SQLAlchemyError as exc:
                self.stats.db_errors += 1
                logger.error("audit batch of %d not stored (%s); retrying in %.1fs",
                             len(parsed), type(exc).__name__, delay)
                if self._stop.wait(delay):
                    return  # unacked: the broker redelivers after restart
                delay = min(RETRY_MAX_S, delay * 2)
        self.stats.inserted += result.inserted
        self.stats.duplicates += result.duplicates
        self.stats.count_kinds(result.kinds)
        self.stats.batches += 1
        for delivery in batch:  # invalid ones too: redelivering them would not make them valid
            delivery.ack()
        if self._after_commit is not None:
            try:
                self._after_commit()
            except Exception:
                logger.exception("audit after-commit hook failed")
        if result.stored_seqs and self._on_events_stored is not None:
            try:
                self._on_events_stored(result.stored_seqs)
            except Exception:
                logger.exception("sending event receipts failed (the doors send the events again)")
        door_keys = {p.device_id: p.body.door_key for p in parsed
                     if isinstance(p.body, BundleAck) and p.body.door_key is not None}
        if door_keys and self._on_door_keys is not None:
            try:
                self._on_door_keys(door_keys)
            except Exception:
                logger.exception("recording the doors' public keys failed (they report them again)")
        if result.bundle_devices and self._on_running_bundles is not None:
            try:
                self._on_running_bundles(result.bundle_devices)
            except Exception:
                logger.exception("audit running-bundle hook failed")
