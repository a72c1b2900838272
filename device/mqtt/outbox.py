"""Events are never lost: an on-disk SQLite (WAL) outbox in front of every event publish.

Life of an event:
1. ``MqttEventSink.emit`` writes it to the outbox (committed, ``synchronous=FULL``) and returns.
2. The publisher thread sends pending rows in sequence order with QoS 1, a bounded window in flight.
3. A row is deleted only when its PUBACK arrives (paho ``on_publish`` with the same mid).
4. After every reconnect the publisher starts again from the oldest row, so anything unacknowledged is
   replayed in order. Replays may duplicate an event; subscribers de-duplicate on ``event_id``.

Size policy (never silent): when the outbox holds ``max_events`` rows, the oldest row is evicted to make
room; each eviction is logged at WARNING with its event id and sequence, counted in ``dropped`` (kept in
the database across restarts) and reported as ``outbox_dropped`` in the retained status. Event ``seq``
numbers are monotonic, so a subscriber also sees the gap.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from device.mqtt.client import MqttClient
from device.protocol.schemas import decision_to_event
from device.protocol.snapshots import SNAPSHOT_KINDS
from device.protocol.topics import Topics
from device.types import Decision

if TYPE_CHECKING:
    from device.mqtt.snapshots import SnapshotPublisher

logger = logging.getLogger(__name__)

# ~700 bytes per event: 100k rows is ~70 MB and more than a day offline at one event per second.
DEFAULT_MAX_EVENTS = 100_000
# Unacknowledged QoS 1 messages in flight at once: enough to saturate loopback, bounded on reconnect.
INFLIGHT_WINDOW = 64
# The publisher also wakes up this often on its own (reconnects, stuck acks).
PUMP_IDLE_S = 0.5
# A message unacknowledged for this long while connected is resent (brokers should never need it).
INFLIGHT_TIMEOUT_S = 60.0


class OutboxError(Exception):
    """The outbox database could not be opened or written."""


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """One pending message."""

    seq: int
    event_id: str
    topic: str
    payload: bytes


class Outbox:
    """The SQLite outbox; thread-safe; ``close()`` is idempotent."""

    def __init__(self, path: Path, max_events: int = DEFAULT_MAX_EVENTS) -> None:
        if max_events < 1:
            raise ValueError(f"max_events must be >= 1, got {max_events}")
        self.path = Path(path)
        self.max_events = max_events
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db: sqlite3.Connection | None = sqlite3.connect(
                str(self.path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT "
                "NOT NULL UNIQUE, topic TEXT NOT NULL, payload BLOB NOT NULL, created REAL NOT NULL)")
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
            self._count = int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        except sqlite3.Error as exc:
            raise OutboxError(f"cannot open the outbox {self.path}: {exc}") from exc

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise OutboxError(f"outbox {self.path} is closed")
        return self._db

    def append(self, event_id: str, topic: str, build: Callable[[int], bytes]) -> int:
        """Store a message whose payload ``build(seq)`` makes from its sequence number; return the seq."""
        with self._lock:
            db = self._conn()
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    self._evict_for_one(db)
                    cur = db.execute(
                        "INSERT INTO outbox (event_id, topic, payload, created) VALUES (?, ?, ?, ?)",
                        (event_id, topic, b"", time.time()))
                    seq = int(cur.lastrowid or 0)
                    db.execute("UPDATE outbox SET payload = ? WHERE seq = ?", (build(seq), seq))
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise OutboxError(f"cannot write to the outbox {self.path}: {exc}") from exc
            self._count += 1
            return seq

    def _evict_for_one(self, db: sqlite3.Connection) -> None:
        excess = self._count - self.max_events + 1
        if excess <= 0:
            return
        rows = db.execute("SELECT seq, event_id FROM outbox ORDER BY seq LIMIT ?", (excess,)).fetchall()
        for seq, event_id in rows:
            logger.warning("outbox full (%d events): evicting the oldest event %s (seq %d)",
                           self.max_events, event_id, seq)
        db.execute("DELETE FROM outbox WHERE seq <= ?", (rows[-1][0],))
        db.execute("INSERT INTO meta (key, value) VALUES ('dropped', ?) "
                   "ON CONFLICT(key) DO UPDATE SET value = value + excluded.value", (len(rows),))
        self._count -= len(rows)

    def pending(self, after: int = 0, limit: int = INFLIGHT_WINDOW) -> list[OutboxRow]:
        """Up to ``limit`` rows with seq > ``after``, oldest first."""
        with self._lock:
            rows = self._conn().execute(
                "SELECT seq, event_id, topic, payload FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
                (after, limit)).fetchall()
        return [OutboxRow(int(s), str(e), str(t), bytes(p)) for s, e, t, p in rows]

    def delete(self, seqs: Iterable[int]) -> int:
        """Remove acknowledged rows; return how many existed."""
        keys = [(int(s),) for s in seqs]
        if not keys:
            return 0
        with self._lock:
            db = self._conn()
            try:
                before = db.total_changes
                db.executemany("DELETE FROM outbox WHERE seq = ?", keys)
                removed = db.total_changes - before
            except sqlite3.Error as exc:
                raise OutboxError(f"cannot remove acknowledged rows in {self.path}: {exc}") from exc
            self._count -= removed
            return removed

    @property
    def depth(self) -> int:
        """Rows waiting for a PUBACK."""
        return self._count

    @property
    def dropped(self) -> int:
        """Rows ever evicted because the outbox was full."""
        with self._lock:
            row = self._conn().execute("SELECT value FROM meta WHERE key = 'dropped'").fetchone()
        return int(row[0]) if row else 0

    def close(self) -> None:
        """Close the database (safe to call twice)."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class OutboxPublisher:
    """Thread that drains the outbox over MQTT: in order, deleting on PUBACK, replaying after reconnects."""

    def __init__(self, client: MqttClient, outbox: Outbox, window: int = INFLIGHT_WINDOW) -> None:
        self.client = client
        self.outbox = outbox
        self.window = window
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._acks: queue.SimpleQueue[tuple[int, bool, int]] = queue.SimpleQueue()
        self._remove_listeners = [
            client.on_published(self._on_ack),
            client.on_connected(self._wake.set),
        ]
        self._thread = threading.Thread(target=self._run, name="outbox-publisher", daemon=True)
        self._thread.start()

    def notify(self) -> None:
        """Something was appended: publish soon."""
        self._wake.set()

    def _on_ack(self, mid: int, ok: bool) -> None:
        # Network thread, under paho's lock: only enqueue.
        self._acks.put((mid, ok, self.client.generation))
        self._wake.set()

    def _run(self) -> None:
        generation = -1
        cursor = 0
        inflight: dict[int, tuple[int, float]] = {}  # mid -> (seq, sent at)
        early: dict[int, bool] = {}  # acks that arrived before publish() returned the mid
        while not self._stop.is_set():
            self._wake.wait(PUMP_IDLE_S)
            self._wake.clear()
            try:
                if not self.client.connected:
                    continue
                if self.client.generation != generation:
                    generation = self.client.generation
                    cursor, inflight, early = 0, {}, {}
                    logger.debug("outbox: (re)connected, replaying %d events", self.outbox.depth)
                cursor = self._drain_acks(generation, inflight, early, cursor)
                cursor = self._check_stuck(inflight, cursor)
                cursor = self._send(generation, inflight, early, cursor)
            except Exception:
                logger.exception("outbox publisher step failed; retrying")
                time.sleep(PUMP_IDLE_S)

    def _drain_acks(self, generation: int, inflight: dict[int, tuple[int, float]], early: dict[int, bool],
                    cursor: int) -> int:
        done: list[int] = []
        while True:
            try:
                mid, ok, gen = self._acks.get_nowait()
            except queue.Empty:
                break
            if gen != generation:
                continue
            entry = inflight.pop(mid, None)
            if entry is None:
                early[mid] = ok
                if len(early) > 4 * self.window:
                    early.pop(next(iter(early)))
                continue
            if ok:
                done.append(entry[0])
            else:
                cursor = min(cursor, entry[0] - 1)
        self.outbox.delete(done)
        return cursor

    def _check_stuck(self, inflight: dict[int, tuple[int, float]], cursor: int) -> int:
        if inflight and len(inflight) >= self.window:
            oldest = min(sent for _, sent in inflight.values())
            if time.monotonic() - oldest > INFLIGHT_TIMEOUT_S:
                logger.warning("outbox: %d events unacknowledged for %.0fs; resending", len(inflight),
                               INFLIGHT_TIMEOUT_S)
                inflight.clear()
                return 0
        return cursor

    def _send(self, generation: int, inflight: dict[int, tuple[int, float]], early: dict[int, bool],
              cursor: int) -> int:
        room = self.window - len(inflight)
        if room <= 0:
            return cursor
        for row in self.outbox.pending(after=cursor, limit=room):
            if self.client.generation != generation:
                break
            handle = self.client.publish(row.topic, row.payload, qos=1)
            if not handle.sent:
                break  # disconnected meanwhile; the next connection replays from the start
            cursor = row.seq
            ok = early.pop(handle.mid, None)
            if ok is None:
                inflight[handle.mid] = (row.seq, time.monotonic())
            elif ok:
                self.outbox.delete([row.seq])
        return cursor

    def wait_drained(self, timeout: float) -> bool:
        """Block until the outbox is empty or ``timeout``; True when empty."""
        deadline = time.monotonic() + timeout
        while self.outbox.depth > 0:
            if time.monotonic() > deadline:
                return False
            self._wake.set()
            time.sleep(0.05)
        return True

    def close(self) -> None:
        """Stop the thread (safe to call twice); pending rows stay on disk for the next start."""
        self._stop.set()
        self._wake.set()
        for remove in self._remove_listeners:
            remove()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)


class MqttEventSink:
    """The agent's EventSink over MQTT: ``emit(decision)`` stores the event durably, then publishes it.

    With a :class:`~device.mqtt.snapshots.SnapshotPublisher` (``[mqtt] snapshots``) the sink asks the
    loop for snapshots (``wants_snapshots``) and queues the JPEG of an unknown/spoof decision beside its
    event, best-effort; the event says ``"snapshot": true`` when one was queued.
    """

    def __init__(self, client: MqttClient, outbox: Outbox, topics: Topics, device_id: str,
                 snapshots: SnapshotPublisher | None = None) -> None:
        self.client = client
        self.outbox = outbox
        self.topic = topics.events(device_id)
        self.device_id = device_id
        self.snapshots = snapshots
        self.failures = 0
        self.publisher = OutboxPublisher(client, outbox)
        self._closed = False

    @property
    def wants_snapshots(self) -> bool:
        """True when snapshots are opted in: the loop then attaches a JPEG to unknown/spoof decisions."""
        return self.snapshots is not None

    def emit(self, decision: Decision) -> None:
        """Queue ``decision`` as an event; never raises (a failed write is logged and counted)."""
        try:
            event = decision_to_event(decision, self.device_id)
            if self.snapshots is not None and decision.snapshot and decision.kind in SNAPSHOT_KINDS:
                # The snapshot is queued first so that the stored event can say whether one exists.
                if self.snapshots.offer(event, decision.snapshot):
                    event = event.model_copy(update={"snapshot": True})
            self.outbox.append(str(event.event_id), self.topic,
                               lambda seq: event.model_copy(update={"seq": seq}).to_bytes())
        except Exception as exc:
            self.failures += 1
            logger.error("could not store an event in the outbox: %s", exc)
            return
        self.publisher.notify()

    def close(self) -> None:
        """Stop publishing (safe to call twice); unsent events stay in the outbox."""
        if not self._closed:
            self._closed = True
            self.publisher.close()
