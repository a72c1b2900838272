"""The server's side of end-to-end event delivery: receipts to the doors (``…/<device>/events/confirm``).

- After each commit the audit subscriber's stored event seqs go back to their doors as
  :class:`~core.protocol.schemas.EventConfirm` ranges; a door keeps an event until one covers it.
- When the audit subscriber (re)connects and has subscribed, every known door gets an empty receipt:
  "the server is listening again". A door that holds events the broker took but the server never
  confirmed (a broker restarted without persistence while the server was away) sends them at once
  instead of waiting for its retry interval, which grows up to 5 minutes while the server is away.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from sqlalchemy import select

from core.protocol.schemas import EventConfirm, utcnow
from core.protocol.topics import Topics
from server.db.models import Device
from server.db.session import Database

logger = logging.getLogger(__name__)

Publish = Callable[[str, bytes], object]


class Receipts:
    """Sends receipts and hellos through ``publish(topic, payload)`` (QoS 1)."""

    def __init__(self, db: Database, topics: Topics, publish: Publish) -> None:
        self.db = db
        self.topics = topics
        self.publish = publish

    def stored(self, stored: dict[str, list[int]]) -> None:
        """Tell each door which of its events are on record (the audit writer's after-commit hook)."""
        for device, seqs in stored.items():
            for receipt in EventConfirm.of(device, seqs):
                self.publish(self.topics.events_confirm(device), receipt.to_bytes())

    def hello(self) -> None:
        """An empty receipt to every known door, off the network thread (the database is read)."""
        threading.Thread(target=self._hello, name="receipt-hello", daemon=True).start()

    def _hello(self) -> None:
        try:
            with self.db.session() as session:
                devices = list(session.scalars(select(Device.device_id)))
            for device in devices:
                try:
                    receipt = EventConfirm(device=device, seqs=[], ts=utcnow())
                except ValueError:
                    continue  # a device id that cannot be addressed (never from a valid topic)
                self.publish(self.topics.events_confirm(device), receipt.to_bytes())
            logger.debug("told %d doors the audit subscriber is listening", len(devices))
        except Exception:
            logger.exception("telling the doors the audit subscriber is back failed (they retry anyway)")
