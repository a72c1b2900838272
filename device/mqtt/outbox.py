"""Events are never lost: an on-disk SQLite (WAL) outbox in front of every event publish.

Life of an event:
1. ``MqttEventSink.emit`` writes it to the outbox (committed, ``synchronous=FULL``) and returns.
2. The publisher thread sends pending rows in sequence order with QoS 1, a bounded window in flight.
3. The broker's PUBACK says the broker has it. With ``confirm`` (``[mqtt] confirm_events``, the
   default) that is not enough, because a broker restarted without persistence forgets what it held
   for a subscriber that was away: the row stays until the server's receipt
   (:class:`~core.protocol.schemas.EventConfirm` on ``…/<device>/events/confirm``, sent by the audit
   subscriber after its commit) covers it. Without ``confirm`` the row is deleted on the PUBACK.
4. After every reconnect the publisher starts again from the oldest row the broker has not
   acknowledged, so anything unacknowledged is replayed in order.
5. A row the broker acknowledged but the server never confirmed was lost on the way (a broker restart
   between the two). It is sent again when a receipt covers a row published after it (the server
   stores in the order the broker delivers, so the older one will not come), and, when no receipt
   arrives at all, the oldest window is sent again after ``CONFIRM_WAIT_S``, doubling up to
   ``CONFIRM_WAIT_MAX_S`` while nothing is confirmed (a server that is away is not flooded), and at
   once when the server says it is listening again (an empty receipt after it re-subscribed).
Replays may duplicate an event; the server stores each ``event_id`` once and confirms duplicates too.

Size policy (never silent): when the outbox holds ``max_events`` rows, the oldest row is evicted to make
room; each eviction is logged at WARNING with its event id and sequence, counted in ``dropped`` (kept in
the database across restarts) and reported as ``outbox_dropped`` in the retained status. Event ``seq``
numbers are monotonic, so a subscriber also sees the gap.
"""

from __future__ import annotations

import bisect
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from core.mqtt.client import MqttClient
from core.protocol.schemas import decision_to_event
from core.protocol.snapshots import SNAPSHOT_KINDS
from core.protocol.topics import Topics
from core.types import Decision
from device.waiting import WaitTimeout, wait_progress

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
# With receipts: the oldest unconfirmed events are sent again after this long without any receipt,
# the wait doubling up to the cap while none comes (the server is away); any receipt resets it.
CONFIRM_WAIT_S = 10.0
CONFIRM_WAIT_MAX_S = 300.0


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

    def delete_ranges(self, ranges: Iterable[tuple[int, int]]) -> int:
        """Remove the rows in inclusive [first, last] seq ranges (a server receipt); return how many."""
        keys = [(int(a), int(b)) for a, b in ranges]
        return self._delete("DELETE FROM outbox WHERE seq BETWEEN ? AND ?", keys, "confirmed")

    def rows(self, seqs: Iterable[int]) -> list[OutboxRow]:
        """The rows among ``seqs`` still in the outbox, oldest first."""
        keys = sorted({int(s) for s in seqs})
        out: list[OutboxRow] = []
        with self._lock:
            db = self._conn()
            for i in range(0, len(keys), 500):
                chunk = keys[i:i + 500]
                marks = ",".join("?" * len(chunk))
                out += [OutboxRow(int(s), str(e), str(t), bytes(p)) for s, e, t, p in db.execute(
                    f"SELECT seq, event_id, topic, payload FROM outbox WHERE seq IN ({marks}) "  # noqa: S608
                    "ORDER BY seq", chunk).fetchall()]
        return out

    def delete(self, seqs: Iterable[int]) -> int:
        """Remove acknowledged rows; return how many existed."""
        return self._delete("DELETE FROM outbox WHERE seq = ?", [(int(s),) for s in seqs], "acknowledged")

    def _delete(self, sql: str, keys: Sequence[tuple[int, ...]], what: str) -> int:
        """Run ``sql`` for every key in one transaction, keep the row count; return how many went."""
        if not keys:
            return 0
        with self._lock:
            db = self._conn()
            try:
                before = db.total_changes
                db.executemany(sql, keys)
                removed = db.total_changes - before
            except sqlite3.Error as exc:
                raise OutboxError(f"cannot remove {what} rows in {self.path}: {exc}") from exc
            self._count -= removed
            return removed

    @property
    def depth(self) -> int:
        """Rows not yet delivered (waiting for the PUBACK, or with receipts for the server's receipt)."""
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
    """Thread that drains the outbox over MQTT: in order, replaying after reconnects, deleting a row on
    its PUBACK or, with ``confirm``, on the server's receipt (see the module docstring)."""

    def __init__(self, client: MqttClient, outbox: Outbox, window: int = INFLIGHT_WINDOW,
                 confirm: bool = False) -> None:
        self.client = client
        self.outbox = outbox
        self.window = window
        self.confirm = confirm
        self.resent = 0  # events sent again because the server never confirmed them
        self.awaiting_receipt = 0  # events the broker acknowledged and the server has not confirmed yet
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._acks: queue.SimpleQueue[tuple[int, bool, int]] = queue.SimpleQueue()
        self._receipts: queue.SimpleQueue[list[tuple[int, int]]] = queue.SimpleQueue()
        self._remove_listeners = [
            client.on_published(self._on_ack),
            client.on_connected(self._wake.set),
        ]
        self._thread = threading.Thread(target=self._run, name="outbox-publisher", daemon=True)
        self._thread.start()

    def notify(self) -> None:
        """Something was appended: publish soon."""
        self._wake.set()

    def on_receipt(self, ranges: list[tuple[int, int]]) -> None:
        """The server stored the events in these inclusive seq ranges (any thread; only enqueues)."""
        self._receipts.put(list(ranges))
        self._wake.set()

    def _on_ack(self, mid: int, ok: bool) -> None:
        # Network thread, under paho's lock: only enqueue.
        self._acks.put((mid, ok, self.client.generation))
        self._wake.set()

    def _run(self) -> None:
        state = _PumpState()
        while not self._stop.is_set():
            self._wake.wait(PUMP_IDLE_S)
            self._wake.clear()
            try:
                connected = self.client.connected
                if connected and self.client.generation != state.generation:
                    state.reconnected(self.client.generation)
                    logger.debug("outbox: (re)connected, replaying %d events", self.outbox.depth)
                # PUBACKs before receipts: paho delivers a message's PUBACK before the server's receipt
                self._drain_acks(state)
                self._take_receipts(state)
                self.awaiting_receipt = len(state.at_broker)
                if not connected:
                    continue
                self._check_stuck(state)
                self._check_unconfirmed(state)
                self._send(state)
            except Exception:
                logger.exception("outbox publisher step failed; retrying")
                time.sleep(PUMP_IDLE_S)

    def _drain_acks(self, state: _PumpState) -> None:
        done: list[int] = []
        while True:
            try:
                mid, ok, gen = self._acks.get_nowait()
            except queue.Empty:
                break
            if gen != state.generation:
                continue
            entry = state.inflight.pop(mid, None)
            if entry is None:
                state.early[mid] = ok
                if len(state.early) > 4 * self.window:
                    state.early.pop(next(iter(state.early)))
                continue
            if ok:
                done.append(entry[0])
                state.at_broker[entry[0]] = entry[1]
            else:
                state.cursor = min(state.cursor, entry[0] - 1)
        if not self.confirm:
            self.outbox.delete(done)
            for seq in done:
                state.at_broker.pop(seq, None)

    def _take_receipts(self, state: _PumpState) -> None:
        """Delete what the server confirmed; anything published before it and still unconfirmed is lost."""
        latest = -1.0
        while True:
            try:
                ranges = self._receipts.get_nowait()
            except queue.Empty:
                break
            if not ranges:  # the server's hello: it (re)subscribed, so try the unconfirmed ones now
                state.hello = True
                state.confirm_wait = CONFIRM_WAIT_S
                continue
            self.outbox.delete_ranges(ranges)
            covered = _coverage(ranges)
            for seq in [s for s in state.at_broker if covered(s)]:
                latest = max(latest, state.at_broker.pop(seq))
            state.resend = {s for s in state.resend if not covered(s)}
            state.receipt_at = time.monotonic()
            state.confirm_wait = CONFIRM_WAIT_S
        if latest >= 0:
            lost = {seq for seq, sent in state.at_broker.items() if sent < latest}
            if lost:
                logger.info("outbox: %d events the broker took were never confirmed by the server "
                            "(a broker restart?); sending them again", len(lost))
                state.resend |= lost

    def _check_unconfirmed(self, state: _PumpState) -> None:
        """No receipt for a while: send the oldest unconfirmed window again, waiting longer each time."""
        if not state.at_broker or state.resend:
            state.hello = False
            return
        now = time.monotonic()
        if state.hello:  # the server is listening again: no need to wait for the retry interval
            state.hello = False
            oldest = sorted(state.at_broker)[:self.window]
            logger.info("outbox: the server is back; sending the oldest %d unconfirmed events again",
                        len(oldest))
            state.resend |= set(oldest)
            state.receipt_at = now
            return
        # Measured from the later of the last receipt and the oldest unconfirmed send: a quiet door's
        # first event after an hour is not "an hour without a receipt".
        since = max(state.receipt_at, min(state.at_broker.values()))
        if now - since < state.confirm_wait:
            return
        oldest = sorted(state.at_broker)[:self.window]
        logger.info("outbox: no receipt from the server for %.0f s; sending the oldest %d unconfirmed "
                    "events again", now - since, len(oldest))
        state.resend |= set(oldest)
        state.receipt_at = now
        state.confirm_wait = min(CONFIRM_WAIT_MAX_S, state.confirm_wait * 2)

    def _check_stuck(self, state: _PumpState) -> None:
        if state.inflight and len(state.inflight) >= self.window:
            oldest = min(sent for _, sent in state.inflight.values())
            if time.monotonic() - oldest > INFLIGHT_TIMEOUT_S:
                logger.warning("outbox: %d events unacknowledged for %.0fs; resending", len(state.inflight),
                               INFLIGHT_TIMEOUT_S)
                state.inflight.clear()
                state.cursor = 0

    def _publish(self, state: _PumpState, row: OutboxRow) -> bool:
        handle = self.client.publish(row.topic, row.payload, qos=1)
        if not handle.sent:
            return False  # disconnected meanwhile; the next connection replays from the start
        now = time.monotonic()
        ok = state.early.pop(handle.mid, None)
        if ok is None:
            state.inflight[handle.mid] = (row.seq, now)
        elif ok:
            state.at_broker[row.seq] = now
            if not self.confirm:
                self.outbox.delete([row.seq])
                state.at_broker.pop(row.seq, None)
        return True

    def _send(self, state: _PumpState) -> None:
        room = self.window - len(state.inflight)
        if room <= 0:
            return
        if state.resend:
            again = self.outbox.rows(sorted(state.resend)[:room])
            present = {row.seq for row in again}
            for seq in sorted(state.resend)[:room]:
                if seq not in present:  # confirmed or evicted meanwhile
                    state.resend.discard(seq)
                    state.at_broker.pop(seq, None)
            for row in again:
                if self.client.generation != state.generation or not self._publish(state, row):
                    return
                state.resend.discard(row.seq)
                self.resent += 1
                room -= 1
        while room > 0:
            rows = self.outbox.pending(after=state.cursor, limit=self.window)
            if not rows:
                return
            for row in rows:
                if row.seq in state.at_broker:  # the broker has it; only a receipt is missing
                    state.cursor = row.seq
                    continue
                if room <= 0:
                    return
                if self.client.generation != state.generation or not self._publish(state, row):
                    return
                state.cursor = row.seq
                room -= 1

    def wait_drained(self, stall_s: float) -> bool:
        """Block until the outbox is empty; False once its depth did not move for ``stall_s`` seconds."""

        def empty() -> bool:
            self._wake.set()
            return self.outbox.depth == 0

        try:
            wait_progress(empty, "the outbox to drain", stall_s=stall_s, progress=lambda: self.outbox.depth)
        except WaitTimeout:
            return False
        return True

    def close(self) -> None:
        """Stop the thread (safe to call twice); pending rows stay on disk for the next start."""
        self._stop.set()
        self._wake.set()
        for remove in self._remove_listeners:
            remove()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)


@dataclass
class _PumpState:
    """The publisher thread's bookkeeping (owned by that thread only)."""

    generation: int = -1
    cursor: int = 0  # highest seq published (or skipped) on this connection
    inflight: dict[int, tuple[int, float]] = field(default_factory=dict)  # mid -> (seq, sent at)
    early: dict[int, bool] = field(default_factory=dict)  # acks that arrived before publish() returned
    at_broker: dict[int, float] = field(default_factory=dict)  # seq -> sent at: PUBACKed, unconfirmed
    resend: set[int] = field(default_factory=set)  # unconfirmed seqs to publish again
    receipt_at: float = field(default_factory=time.monotonic)
    confirm_wait: float = CONFIRM_WAIT_S
    hello: bool = False  # an empty receipt arrived: the server (re)subscribed

    def reconnected(self, generation: int) -> None:
        """A new connection: replay from the oldest row the broker has not acknowledged."""
        self.generation = generation
        self.cursor, self.inflight, self.early = 0, {}, {}


def _coverage(ranges: list[tuple[int, int]]) -> Callable[[int], bool]:
    """A membership test for inclusive [first, last] ranges (merged, then bisected: receipts may be long)."""
    merged: list[list[int]] = []
    for first, last in sorted(ranges):
        if merged and first <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], last)
        else:
            merged.append([first, last])
    firsts = [first for first, _ in merged]

    def covered(seq: int) -> bool:
        i = bisect.bisect_right(firsts, seq) - 1
        return i >= 0 and seq <= merged[i][1]

    return covered


class MqttEventSink:
    """The agent's EventSink over MQTT: ``emit(decision)`` stores the event durably, then publishes it.

    With a :class:`~device.mqtt.snapshots.SnapshotPublisher` (``[mqtt] snapshots``) the sink asks the
    loop for snapshots (``wants_snapshots``) and queues the JPEG of an unknown/spoof decision beside its
    event, best-effort; the event says ``"snapshot": true`` when one was queued.
    """

    def __init__(self, client: MqttClient, outbox: Outbox, topics: Topics, device_id: str,
                 snapshots: SnapshotPublisher | None = None, confirm: bool = False) -> None:
        self.client = client
        self.outbox = outbox
        self.topic = topics.events(device_id)
        self.device_id = device_id
        self.snapshots = snapshots
        self.failures = 0
        self.publisher = OutboxPublisher(client, outbox, confirm=confirm)
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
