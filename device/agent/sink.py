"""Where decisions leave the frame loop: a small ``EventSink`` interface and its local implementations.

The MQTT issue adds a sink that writes to the outbox and publishes; here are a JSON-lines file sink
(standalone doors), a logging sink and an in-memory sink (tests, demo). A sink must not block the loop
for long and must not raise: the loop logs and counts any exception a sink lets escape.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from core.protocol.schemas import decision_record
from core.types import Decision

logger = logging.getLogger(__name__)


class EventSink(Protocol):
    """Receives every decision the loop makes.

    A sink that publishes opt-in snapshots also has a ``wants_snapshots`` attribute that is True; only
    then does the loop attach a JPEG (``Decision.snapshot``) to unknown/spoof decisions. Other sinks
    need not declare it and must never write ``Decision.snapshot`` anywhere (biometric data).
    """

    def emit(self, decision: Decision) -> None:
        """Deliver one decision (called on the processing thread)."""
        ...

    def close(self) -> None:
        """Flush and release (idempotent)."""
        ...


class JsonLinesSink:
    """Appends one JSON object per decision to a file, flushed and fsynced per line."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._handle: Any = open(self.path, "a", encoding="utf-8")  # closed in close()

    def emit(self, decision: Decision) -> None:
        """Append the decision as one line."""
        line = json.dumps(decision_record(decision), ensure_ascii=False)
        with self._lock:
            if self._handle is None:
                raise ValueError(f"sink {self.path} is closed")
            self._handle.write(line + "\n")
            self._handle.flush()
            os.fsync(self._handle.fileno())

    def close(self) -> None:
        """Close the file (safe to call twice)."""
        with self._lock:
            if self._handle is not None:
                self._handle.close()
                self._handle = None

    def __enter__(self) -> JsonLinesSink:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class LoggingSink:
    """Logs each decision at INFO (ids and scores only)."""

    def emit(self, decision: Decision) -> None:
        """Log the decision."""
        logger.info("event %s person=%s score=%.3f", decision.kind.value, decision.person_id, decision.score)

    def close(self) -> None:
        """Nothing to release."""


class MemorySink:
    """Keeps decisions in a list, thread-safe (tests and the demo)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._decisions: list[Decision] = []
        self.closed = False

    def emit(self, decision: Decision) -> None:
        """Store the decision."""
        with self._lock:
            self._decisions.append(decision)

    @property
    def decisions(self) -> list[Decision]:
        """A copy of what was emitted, oldest first."""
        with self._lock:
            return list(self._decisions)

    def close(self) -> None:
        """Mark closed; the list stays readable."""
        self.closed = True


class FanOutSink:
    """Delivers to several sinks; one failing sink does not stop the others."""

    def __init__(self, *sinks: EventSink) -> None:
        self._sinks: list[EventSink] = list(sinks)
        self._lock = threading.Lock()

    def add(self, sink: EventSink) -> None:
        """Attach another sink (e.g. MQTT once connected)."""
        with self._lock:
            self._sinks.append(sink)

    @property
    def wants_snapshots(self) -> bool:
        """True when any sink asks for snapshots (``wants_snapshots`` attribute set to True)."""
        with self._lock:
            sinks = list(self._sinks)
        return any(getattr(sink, "wants_snapshots", False) is True for sink in sinks)

    def emit(self, decision: Decision) -> None:
        """Emit to each sink, logging (never raising) individual failures."""
        with self._lock:
            sinks = list(self._sinks)
        for sink in sinks:
            try:
                sink.emit(decision)
            except Exception:  # a broken sink must not stop the door or the other sinks
                logger.exception("event sink %s failed", type(sink).__name__)

    def close(self) -> None:
        """Close every sink (idempotent per sink)."""
        with self._lock:
            sinks, self._sinks = self._sinks, []
        for sink in sinks:
            try:
                sink.close()
            except Exception:  # closing must go on for the rest
                logger.exception("closing event sink %s failed", type(sink).__name__)
