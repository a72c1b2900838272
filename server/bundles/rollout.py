"""Fleet rollout state from the devices' retained acks and availability (works without the server DB)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any

from device.mqtt.client import Message, MqttClient
from device.protocol.schemas import BundleAck, PayloadError
from device.protocol.topics import Topics

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DeviceRollout:
    """What one device last said about bundles, and whether it is online."""

    device: str
    available: str | None = None
    ack: BundleAck | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready row."""
        ack = self.ack
        return {
            "device": self.device,
            "available": self.available,
            "running_sequence": ack.running_sequence if ack else None,
            "sequence": ack.sequence if ack else None,
            "state": ack.state if ack else None,
            "percent": ack.percent if ack else None,
            "reason": ack.reason if ack else None,
            "delta_sequence": ack.delta_sequence if ack else None,
            "delta_state": ack.delta_state if ack else None,
            "ts": ack.ts.isoformat() if ack else None,
        }


class RolloutTracker:
    """Collects every device's ``bundle/ack`` and ``available``; a context manager."""

    def __init__(self, client: MqttClient, topics: Topics) -> None:
        self.client = client
        self.topics = topics
        self._devices: dict[str, DeviceRollout] = {}
        self.updates = 0  # messages taken in so far: what a wait watches for progress
        self._changed = threading.Condition()
        self._undo: list[Callable[[], None]] = []

    def start(self) -> RolloutTracker:
        """Subscribe (retained messages arrive at once)."""
        self._undo = [self.client.subscribe(self.topics.all_bundle_acks, self._on_ack),
                      self.client.subscribe(self.topics.all_available, self._on_available)]
        return self

    def close(self) -> None:
        """Unsubscribe (safe to call twice)."""
        for undo in self._undo:
            undo()
        self._undo = []

    def __enter__(self) -> RolloutTracker:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _update(self, device: str, **changes: Any) -> None:
        with self._changed:
            current = self._devices.get(device, DeviceRollout(device))
            self._devices[device] = replace(current, **changes)
            self.updates += 1
            self._changed.notify_all()

    def _on_ack(self, message: Message) -> None:
        device = Topics.device_of(message.topic)
        if device is None or not message.payload:
            return
        try:
            ack = BundleAck.parse(message.payload)
        except PayloadError as exc:
            logger.warning("ignoring a malformed bundle ack on %s: %s", message.topic, exc)
            return
        self._update(device, ack=ack)

    def _on_available(self, message: Message) -> None:
        device = Topics.device_of(message.topic)
        text = message.payload.decode("utf-8", "replace")[:16]
        if device is not None and text in ("online", "offline"):
            self._update(device, available=text)

    def snapshot(self) -> dict[str, DeviceRollout]:
        """Device id -> latest state."""
        with self._changed:
            return dict(self._devices)

    def wait(self, predicate: Callable[[dict[str, DeviceRollout]], bool], timeout: float) -> bool:
        """Block until ``predicate(snapshot)`` holds or ``timeout``."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate(dict(self._devices)), timeout)


def installed(devices: dict[str, DeviceRollout], sequence: int) -> set[str]:
    """Devices running ``sequence`` or newer."""
    return {d for d, r in devices.items() if r.ack and (r.ack.running_sequence or 0) >= sequence}


def summary(devices: dict[str, DeviceRollout], sequence: int | None = None) -> dict[str, int]:
    """Count of devices per state (for ``sequence`` when given)."""
    counts: dict[str, int] = {}
    for row in devices.values():
        ack = row.ack
        if ack is None:
            state = "no_ack"
        elif sequence is not None and (ack.running_sequence or 0) >= sequence:
            state = "installed"
        elif sequence is not None and ack.sequence != sequence:
            state = "waiting"
        else:
            state = ack.state
        counts[state] = counts.get(state, 0) + 1
    return counts
