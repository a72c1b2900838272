"""Offer again what every door must have: the latest bundle announcement and the latest gallery delta.

The protocol is correct on any MQTT 3.1.1 broker without persistence. Such a broker, restarted, has
forgotten every retained message; a managed broker may drop retained messages altogether. So the
server never assumes the announcement or the delta is still retained: it publishes them again (still
retained, for the brokers that keep them)

- when its own client (re)connects: the broker may be a fresh one;
- when a door says hello: a door publishes its bundle ack on every connect and on a ``sync`` command,
  and an ack that shows it behind (it never heard of the bundle on offer, or holds an older delta) is
  answered with the offer;
- every ``interval_s``, in case a message was lost anyway.

Doors ignore an offer they already hold (same sequence), so offering is idempotent. One worker thread
publishes, never paho's network thread, and bursts coalesce: a site of doors reconnecting after a
broker restart costs one offer, not one per door (at most one per :data:`MIN_GAP_S`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Protocol

from device.mqtt.client import Message, MqttClient
from device.protocol.schemas import BundleAck, PayloadError
from device.protocol.topics import Topics

logger = logging.getLogger(__name__)

# Re-offer everything this often even when nobody asked (a lost message, a broker that dropped retained
# ones between two hellos). Offers are small (one announcement, one delta); doors ignore repeats.
OFFER_INTERVAL_S = 300.0
# Hellos arriving closer together than this share one offer (a whole site reconnecting at once).
MIN_GAP_S = 1.0
JOIN_TIMEOUT_S = 10.0


class Offer(Protocol):
    """Something a door must have, which the server can publish again."""

    name: str

    def offer(self) -> bool:
        """Publish it again now; False when there is nothing to offer yet."""
        ...

    def behind(self, ack: BundleAck) -> bool:
        """True when a door that sent ``ack`` lacks it."""
        ...


class OfferKeeper:
    """Re-publishes its offers on reconnect, on a hello from a door that is behind, and periodically."""

    def __init__(self, client: MqttClient, topics: Topics, offers: list[Offer],
                 interval_s: float = OFFER_INTERVAL_S, min_gap_s: float = MIN_GAP_S) -> None:
        if interval_s <= 0 or min_gap_s < 0:
            raise ValueError("interval_s must be > 0 and min_gap_s >= 0")
        self.client = client
        self.topics = topics
        self.offers = list(offers)
        self.interval_s = interval_s
        self.min_gap_s = min_gap_s
        self.offered = {offer.name: 0 for offer in self.offers}  # how many times each was re-published
        self._pending: set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._undo: list[Callable[[], None]] = []
        self._thread: threading.Thread | None = None

    def start(self) -> OfferKeeper:
        """Listen for hellos and reconnects; offer once at once (the broker may have forgotten)."""
        with self._lock:
            if self._thread is not None:
                return self
            self._undo = [self.client.subscribe(self.topics.all_bundle_acks, self._on_ack),
                          self.client.on_connected(self.request)]
            self._thread = threading.Thread(target=self._run, name="offer-keeper", daemon=True)
            self._thread.start()
        if self.client.connected:
            self.request()
        return self

    def close(self) -> None:
        """Stop offering (safe to call twice)."""
        self._stop.set()
        self._wake.set()
        with self._lock:
            undo, self._undo = self._undo, []
            thread, self._thread = self._thread, None
        for step in undo:
            step()
        if thread is not None and thread is not threading.current_thread():
            thread.join(JOIN_TIMEOUT_S)

    def __enter__(self) -> OfferKeeper:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def request(self, names: set[str] | None = None) -> None:
        """Offer ``names`` (default: everything) soon, from any thread."""
        with self._lock:
            self._pending |= names if names is not None else {offer.name for offer in self.offers}
        self._wake.set()

    def _on_ack(self, message: Message) -> None:
        """A door's hello (network thread): queue the offers it lacks."""
        if not message.payload:
            return
        try:
            ack = BundleAck.parse(message.payload)
        except PayloadError:
            return  # the rollout tracker and the audit subscriber log malformed acks
        behind = set()
        for offer in self.offers:
            try:
                if offer.behind(ack):
                    behind.add(offer.name)
            except Exception:
                logger.exception("deciding whether %s lacks the %s failed", ack.device, offer.name)
        if behind:
            logger.debug("%s is behind on %s: offering again", ack.device, ", ".join(sorted(behind)))
            self.request(behind)

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._wake.wait(self.interval_s):
                self.request()  # the periodic offer
            self._wake.clear()
            with self._lock:
                names, self._pending = self._pending, set()
            if names and self.client.connected:
                self._publish(names)
            elif names:
                with self._lock:  # offered once connected again (on_connected asks for everything)
                    self._pending |= names
            if self._stop.wait(self.min_gap_s):
                return

    def _publish(self, names: set[str]) -> None:
        for offer in self.offers:
            if offer.name not in names:
                continue
            try:
                if offer.offer():
                    self.offered[offer.name] += 1
            except Exception:
                logger.exception("offering the %s again failed; retrying at the next hello", offer.name)
