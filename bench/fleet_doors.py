"""The simulated doors of ``facegate bench fleet``: one MQTT client per site publishing for its doors.

200 paho clients (each with its network thread) would measure the bench on 2 cores, not the fleet, so
one :class:`SiteDoors` speaks for every door of a site, on the site broker, with the doors' wire format
(:class:`~core.protocol.schemas.EventPayload` on ``Topics(prefix, site).events(door)``, QoS 1) and their
delivery rule (:mod:`device.mqtt.outbox`): each door keeps an event until the server's receipt on
``…/<door>/events/confirm`` covers it, and sends unconfirmed events again

- when a receipt covers a later event of the same door (the older one was lost on the way),
- after ``CONFIRM_WAIT_S`` without any receipt for that door (doubling up to ``CONFIRM_WAIT_MAX_S``),
- at once when the server says it (re)subscribed (an empty receipt).

Life of a simulated event: the site's pump thread makes it when its door is due (``rate`` events/s per
door, the doors staggered evenly), stamps ``ts`` with the wall clock, publishes it and keeps it as
pending; paho's network thread only enqueues receipts; the pump thread applies them and re-sends.
Only the pump thread touches the doors' state.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from core.mqtt.client import ClientSettings, Message, MqttClient
from core.protocol.schemas import EventConfirm, EventPayload, LivenessPayload, PayloadError, utcnow
from core.protocol.topics import Topics
from core.types import DecisionKind, LivenessVerdict
from device.mqtt.outbox import CONFIRM_WAIT_MAX_S, CONFIRM_WAIT_S, INFLIGHT_WINDOW

logger = logging.getLogger(__name__)

KINDS = (DecisionKind.GRANTED, DecisionKind.GRANTED, DecisionKind.UNKNOWN, DecisionKind.DENIED)
PUMP_IDLE_S = 0.05  # the pump wakes at least this often (receipts, re-send checks)
CHECK_EVERY_S = 0.5  # re-send timers are checked this often, as the door's pump does
CONNECT_TIMEOUT_S = 15.0


class DoorsError(Exception):
    """A site's doors could not reach their broker."""


@dataclass
class _Door:
    """One door's outbox, as far as the server can tell: pending events until their receipt."""

    device: str
    seq: int = 0
    pending: dict[int, tuple[bytes, float]] = field(default_factory=dict)  # seq -> (payload, last sent)
    receipt_at: float = field(default_factory=time.monotonic)
    confirm_wait: float = CONFIRM_WAIT_S
    resend: set[int] = field(default_factory=set)
    hello: bool = False


@dataclass(frozen=True, slots=True)
class SiteCounts:
    """What a site's doors did: every event id made, every publish including re-sends."""

    event_ids: list[str]
    publishes: int
    resent: int
    pending: int


class SiteDoors:
    """The doors of one site on its broker; :meth:`start`, :meth:`stop_sending`, :meth:`close`."""

    def __init__(self, topics: Topics, devices: list[str], host: str, port: int, rate: float,
                 start_at: float, duration_s: float) -> None:
        self.topics = topics
        self.rate = rate
        self.start_at = start_at  # monotonic: the first door's first event
        self.end_at = start_at + duration_s
        self._doors = {d: _Door(d) for d in devices}
        self._order = list(devices)
        self._receipts: queue.Queue[EventConfirm] = queue.Queue()
        self._sending = threading.Event()
        self._sending.set()
        self._wake = threading.Event()  # a receipt arrived
        self._stop = threading.Event()
        self._lock = threading.Lock()  # guards the counters read by other threads
        self._event_ids: list[str] = []
        self._publishes = 0
        self._resent = 0
        self._pending = 0
        self._client = MqttClient(ClientSettings(host=host, port=port,
                                                 client_id=f"bench-doors-{topics.site}-{uuid.uuid4().hex[:6]}"))
        self._thread = threading.Thread(target=self._run, name=f"doors-{topics.site}", daemon=True)
        self._unsubscribe: Callable[[], None] | None = None

    def start(self) -> SiteDoors:
        """Connect, subscribe to the doors' receipts and start the pump thread."""
        self._client.start()
        if not self._client.wait_connected(CONNECT_TIMEOUT_S):
            self._client.close()
            raise DoorsError(f"site {self.topics.site}: no broker at {self._client.settings.host}:"
                             f"{self._client.settings.port}")
        self._unsubscribe = self._client.subscribe(self.topics.all_events_confirms, self._on_receipt, qos=1)
        self._thread.start()
        return self

    def counts(self) -> SiteCounts:
        """A consistent copy of the counters (any thread)."""
        with self._lock:
            return SiteCounts(list(self._event_ids), self._publishes, self._resent, self._pending)

    def stop_sending(self) -> None:
        """Make no new events (the pump keeps re-sending until every pending one has its receipt)."""
        self._sending.clear()

    def close(self) -> None:
        """Stop the pump and disconnect (safe to call twice)."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        self._client.close()

    def _on_receipt(self, message: Message) -> None:
        # paho's network thread: parse and enqueue only.
        try:
            self._receipts.put(EventConfirm.parse(message.payload))
            self._wake.set()
        except PayloadError as exc:
            logger.warning("bad receipt on %s: %s", message.topic, exc)

    def _event(self, door: _Door) -> bytes:
        door.seq += 1
        event = EventPayload(event_id=uuid.uuid4(), seq=door.seq, ts=utcnow(), device=door.device,
                             decision=KINDS[door.seq % len(KINDS)], person_id=f"p{door.seq % 50}", name=None,
                             score=0.7, margin=0.1, liveness=LivenessPayload(verdict=LivenessVerdict.SKIPPED))
        with self._lock:
            self._event_ids.append(str(event.event_id))
        return event.to_bytes()

    def _publish(self, door: _Door, seq: int, payload: bytes, again: bool) -> None:
        self._client.publish(self.topics.events(door.device), payload, qos=1)
        door.pending[seq] = (payload, time.monotonic())
        with self._lock:
            self._publishes += 1
            self._resent += int(again)

    def _run(self) -> None:
        made = 0  # events made so far by all doors of the site, in the staggered round-robin order
        per_s = self.rate * len(self._order)
        next_check = time.monotonic() + CHECK_EVERY_S
        while not self._stop.is_set():
            try:
                now = time.monotonic()
                while self._sending.is_set() and now < self.end_at:
                    due = self.start_at + made / per_s
                    if due > now:
                        break
                    door = self._doors[self._order[made % len(self._order)]]
                    payload = self._event(door)
                    self._publish(door, door.seq, payload, again=False)
                    made += 1
                self._take_receipts()
                if now >= next_check:
                    next_check = now + CHECK_EVERY_S
                    for door in self._doors.values():
                        self._check_unconfirmed(door, now)
                for door in self._doors.values():
                    self._send_again(door)
                with self._lock:
                    self._pending = sum(len(d.pending) for d in self._doors.values())
                wait = PUMP_IDLE_S
                if self._sending.is_set() and now < self.end_at:
                    wait = min(wait, max(0.0, self.start_at + made / per_s - time.monotonic()))
                self._wake.wait(wait)
                self._wake.clear()
            except Exception:
                logger.exception("site %s door pump step failed; continuing", self.topics.site)
                time.sleep(PUMP_IDLE_S)

    def _take_receipts(self) -> None:
        """Forget what the server confirmed; an older event still pending was lost: send it again."""
        while True:
            try:
                receipt = self._receipts.get_nowait()
            except queue.Empty:
                return
            door = self._doors.get(receipt.device)
            if door is None:
                continue
            if not receipt.seqs:  # the server (re)subscribed: try the unconfirmed ones now
                door.hello = True
                continue
            latest = -1.0
            for first, last in receipt.seqs:
                for seq in [s for s in door.pending if first <= s <= last]:
                    latest = max(latest, door.pending.pop(seq)[1])
                    door.resend.discard(seq)
            door.receipt_at = time.monotonic()
            door.confirm_wait = CONFIRM_WAIT_S
            if latest >= 0:
                door.resend |= {seq for seq, (_, sent) in door.pending.items() if sent < latest}

    @staticmethod
    def _check_unconfirmed(door: _Door, now: float) -> None:
        """No receipt for a while (or the server's hello): the oldest window goes again."""
        if not door.pending or door.resend:
            door.hello = False
            return
        oldest = sorted(door.pending)[:INFLIGHT_WINDOW]
        if door.hello:
            door.hello = False
            door.resend |= set(oldest)
            door.receipt_at = now
            return
        since = max(door.receipt_at, min(sent for _, sent in door.pending.values()))
        if now - since >= door.confirm_wait:
            door.resend |= set(oldest)
            door.receipt_at = now
            door.confirm_wait = min(CONFIRM_WAIT_MAX_S, door.confirm_wait * 2)

    def _send_again(self, door: _Door) -> None:
        for seq in sorted(door.resend):
            entry = door.pending.get(seq)
            if entry is not None:
                self._publish(door, seq, entry[0], again=True)
        door.resend.clear()
