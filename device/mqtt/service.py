"""The device's MQTT side: availability + last will, retained status, commands, Home Assistant discovery.

- ``…/<device>/available``: ``online`` (retained) on every connect; the broker publishes the will
  ``offline`` (retained) when the device vanishes; ``close()`` publishes ``offline`` itself.
- ``…/<device>/status``: retained :class:`StatusPayload` every ``mqtt.status_interval_s`` and on connect.
- ``…/<device>/events/confirm``: the server's receipts for stored events (``[mqtt] confirm_events``);
  the outbox keeps each event until one covers it.
- ``…/<device>/cmd/<name>/set``: ``unlock`` (``seconds`` or HA's ``action``), ``reload``, ``sync``; each
  answered with a :class:`CommandResponse` carrying the request's correlation id on
  ``…/cmd/<name>/response`` (and on the v5 response topic when the request named one). A command that
  was retained, carries no ``ts``, or whose ``ts`` is more than ``mqtt.command_max_age_s`` away from the
  device's clock is refused, and the response says why: a queued or replayed unlock never opens the door.
  An unlock is an event (``manual_unlock``, with ``requested_by`` and the correlation id) in the outbox.
- Home Assistant discovery configs (retained), re-published when ``homeassistant/status`` is ``online``.
- ``…/<device>/snapshot``: with ``[mqtt] snapshots`` only, best-effort JPEGs of unknown/spoof events
  (framing and delivery rules in :mod:`device.protocol.snapshots`).
Commands run on a worker thread, never on paho's network thread.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from types import TracebackType
from typing import Literal, Protocol

from device.bundles.updater import BundleUpdater
from device.config import DeviceConfig
from device.mqtt import homeassistant
from device.mqtt.client import ClientSettings, Message, MqttClient, Will
from device.mqtt.outbox import MqttEventSink, Outbox
from device.mqtt.snapshots import SnapshotPublisher
from device.protocol.schemas import (
    CommandRequest,
    CommandResponse,
    EventConfirm,
    PayloadError,
    StatusPayload,
    VersionsPayload,
    utcnow,
)
from device.protocol.topics import HA_STATUS_TOPIC, Topics
from facegate import __version__

logger = logging.getLogger(__name__)

ONLINE, OFFLINE = b"online", b"offline"
OUTBOX_FILE = "outbox.sqlite3"
# close() waits this long for the "offline" message to reach the broker.
OFFLINE_WAIT_S = 2.0
DoorText = Literal["locked", "unlocked", "fault", "unknown"]
DOOR_STATES: dict[str, DoorText] = {"locked": "locked", "unlocked": "unlocked", "fault": "fault"}


class AgentStatusLike(Protocol):
    """The fields of the agent's status snapshot that the status topic carries."""

    @property
    def fps(self) -> float: ...
    @property
    def queue_drops(self) -> int: ...
    @property
    def door_state(self) -> str: ...
    @property
    def model_version(self) -> str: ...
    @property
    def gallery_version(self) -> str: ...
    @property
    def liveness(self) -> str: ...
    @property
    def warnings(self) -> Mapping[str, str]: ...


class AgentControl(Protocol):
    """What commands act on (``device.agent.loop.Agent`` satisfies it)."""

    def status(self) -> AgentStatusLike:
        """Current snapshot."""
        ...

    def manual_unlock(self, seconds: float | None = None, *, requested_by: str = "",
                      correlation_id: str = "") -> float:
        """Open the door for ``seconds`` (None: the configured default), record the event; return seconds."""
        ...

    def reload(self) -> object:
        """Re-open models and gallery from disk."""
        ...


class CommandError(Exception):
    """A command was refused (unknown name, bad arguments, no agent, stale or retained)."""


def stale_reason(request: CommandRequest, retained: bool, max_age_s: float,
                 now: datetime | None = None) -> str | None:
    """Why a command must not be obeyed (retained, no ``ts``, too old or from the future), or None."""
    if retained:
        return ("refused: retained command (a retained command would run again at every reconnect); publish "
                "commands with retain = false")
    if request.ts is None:
        return "refused: the command has no ts (ISO-8601 time it was sent); add one"
    age = ((now or utcnow()) - request.ts).total_seconds()
    if age > max_age_s:
        return f"refused: the command is {age:.0f} s old (limit mqtt.command_max_age_s = {max_age_s:g} s)"
    if age < -max_age_s:
        return (f"refused: the command's ts is {-age:.0f} s in the future (limit {max_age_s:g} s): check the "
                "clocks of sender and device")
    return None


class DeviceMqtt:
    """Owns the device's MQTT client, outbox and event sink; a context manager, ``close()`` idempotent."""

    def __init__(self, config: DeviceConfig, agent: AgentControl | None = None, *,
                 client: MqttClient | None = None, software_version: str = __version__) -> None:
        self.config = config
        self.agent = agent
        self.device_id = config.device.id
        self.topics = Topics(config.mqtt.prefix, config.device.site)
        self.software_version = software_version
        self.updater: BundleUpdater | None = None
        self._started_at = time.monotonic()
        will = Will(self.topics.available(self.device_id), OFFLINE)
        settings = ClientSettings.from_config(config.mqtt, f"facegate-{config.device.site}-{self.device_id}")
        self.client = client or MqttClient(settings, will)
        self.outbox = Outbox(config.device.data_dir / OUTBOX_FILE, config.mqtt.outbox_max_events)
        # Opt-in, best-effort JPEGs of unknown/spoof events on …/snapshot (device.protocol.snapshots).
        self.snapshots = (SnapshotPublisher(self.client, self.topics, self.device_id)
                          if config.mqtt.snapshots else None)
        self.sink = MqttEventSink(self.client, self.outbox, self.topics, self.device_id, self.snapshots,
                                  confirm=config.mqtt.confirm_events)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mqtt-cmd")
        self._stop = threading.Event()
        self._status_thread = threading.Thread(target=self._status_loop, name="mqtt-status", daemon=True)
        self._undo: list[Callable[[], None]] = []
        self._closed = False

    def attach_updater(self, updater: BundleUpdater) -> None:
        """Let ``sync`` and the status topic use the bundle updater."""
        self.updater = updater

    def start(self) -> DeviceMqtt:
        """Subscribe, start the status thread and connect in the background."""
        self._undo = [
            self.client.on_connected(self._on_connect),
            self.client.subscribe(self.topics.commands_filter(self.device_id), self._on_command),
        ]
        if self.config.mqtt.homeassistant:
            self._undo.append(self.client.subscribe(HA_STATUS_TOPIC, self._on_ha_status))
        if self.config.mqtt.confirm_events:
            self._undo.append(self.client.subscribe(self.topics.events_confirm(self.device_id),
                                                    self._on_receipt))
        self.client.start()
        self._status_thread.start()
        return self

    def close(self) -> None:
        """Publish ``offline``, stop threads, close the client and the outbox (safe to call twice)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self.client.connected:
            handle = self.client.publish(self.topics.available(self.device_id), OFFLINE, qos=1, retain=True)
            handle.wait_for_publish(OFFLINE_WAIT_S)
        for undo in self._undo:
            undo()
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.sink.close()
        if self.snapshots is not None:
            self.snapshots.close()
        if self._status_thread.is_alive():
            self._status_thread.join(timeout=5)
        self.client.close()
        self.outbox.close()

    def __enter__(self) -> DeviceMqtt:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ------------------------------------------------------------------ availability, status, discovery

    def _on_connect(self) -> None:
        self.client.publish(self.topics.available(self.device_id), ONLINE, qos=1, retain=True)
        if self.config.mqtt.homeassistant:
            self.publish_discovery()
        self._executor.submit(self.publish_status)

    def publish_discovery(self) -> None:
        """Publish every Home Assistant discovery config (retained)."""
        configs = homeassistant.discovery_configs(self.topics, self.device_id, self.software_version)
        for topic, config in configs:
            self.client.publish(topic, homeassistant.encode(config), qos=1, retain=True)

    def _on_ha_status(self, message: Message) -> None:
        if message.payload.strip().lower() == b"online":
            logger.info("Home Assistant came online: re-publishing discovery")
            self.publish_discovery()

    def _on_receipt(self, message: Message) -> None:
        """The server stored some of our events: the outbox may let them go."""
        try:
            receipt = EventConfirm.parse(message.payload)
        except PayloadError as exc:
            logger.warning("ignoring a malformed event receipt: %s", exc)
            return
        if receipt.device != self.device_id:
            logger.warning("ignoring an event receipt addressed to %s", receipt.device)
            return
        self.sink.publisher.on_receipt(receipt.seqs)

    def status_payload(self) -> StatusPayload:
        """The current status."""
        fps, drops, model, gallery, liveness = 0.0, 0, "", "", ""
        warnings: list[str] = []
        door: DoorText = "unknown"
        if self.agent is not None:
            try:
                snap = self.agent.status()
                fps, drops = snap.fps, snap.queue_drops
                model, gallery = snap.model_version, snap.gallery_version
                door = DOOR_STATES.get(snap.door_state, "unknown")
                liveness, warnings = snap.liveness, [w[:256] for w in list(snap.warnings.values())[:16]]
            except Exception as exc:
                logger.warning("agent status unavailable: %s", exc)
        updater = self.updater
        versions = VersionsPayload(
            software=self.software_version, model=model[:256], gallery=gallery[:256],
            bundle_sequence=(updater.running_sequence or None) if updater else None,
            delta_sequence=updater.delta_sequence if updater else 0)
        uptime = time.monotonic() - self._started_at
        return StatusPayload(device=self.device_id, ts=utcnow(), uptime_s=uptime, fps=max(0.0, float(fps)),
                             outbox_depth=self.outbox.depth, outbox_dropped=self.outbox.dropped, door=door,
                             queue_drops=max(0, int(drops)), versions=versions, liveness=liveness[:256],
                             warnings=warnings)

    def publish_status(self) -> None:
        """Publish the retained status now."""
        try:
            payload = self.status_payload().to_bytes()
        except Exception as exc:
            logger.warning("status could not be built: %s", exc)
            return
        self.client.publish(self.topics.status(self.device_id), payload, qos=1, retain=True)

    def _status_loop(self) -> None:
        while not self._stop.wait(self.config.mqtt.status_interval_s):
            if self.client.connected:
                self.publish_status()

    # ------------------------------------------------------------------ commands

    def _on_command(self, message: Message) -> None:
        name = self.topics.command_of(message.topic, self.device_id)
        if name is None:
            return
        try:
            request = CommandRequest.parse(message.payload) if message.payload.strip() else CommandRequest()
        except PayloadError as exc:
            logger.warning("malformed %s command: %s", name, exc)
            self._respond(name, None, False, f"malformed request: {exc}", message)
            return
        stale = stale_reason(request, message.retain, self.config.mqtt.command_max_age_s)
        if stale is not None:
            logger.warning("%s command %s %s", name, request.correlation_id or "-", stale)
            self._respond(name, request.correlation_id, False, stale, message)
            return
        if not self._closed:
            self._executor.submit(self._run_command, name, request, message)

    def _run_command(self, name: str, request: CommandRequest, message: Message) -> None:
        try:
            detail = self.execute(name, request)
        except Exception as exc:
            logger.warning("command %s failed: %s", name, exc)
            self._respond(name, request.correlation_id, False, str(exc)[:256], message)
            return
        self._respond(name, request.correlation_id, True, detail, message)
        if name == "unlock":
            self.publish_status()

    def execute(self, name: str, request: CommandRequest) -> str:
        """Run one command; return a short detail or raise."""
        if name == "sync":
            if self.updater is None:
                raise CommandError("bundles are disabled on this device")
            self.updater.sync()
            self.publish_status()
            return f"bundle state re-published (running {self.updater.running_sequence or 'none'})"
        if self.agent is None:
            raise CommandError("no agent is running")
        if name == "unlock":
            if request.action == "LOCK":
                raise CommandError("the door locks by itself when the unlock window ends")
            # Home Assistant sends no correlation id: the event gets one of its own.
            correlation = request.correlation_id or f"{self.device_id}-{uuid.uuid4().hex[:12]}"
            opened = self.agent.manual_unlock(request.seconds, requested_by=request.requested_by or "mqtt",
                                              correlation_id=correlation)
            return f"unlocked for {opened:.1f} s"
        if name == "reload":
            result = self.agent.reload()
            return f"reloaded ({result})" if isinstance(result, str) else "reloaded"
        raise CommandError(f"unknown command {name!r} (known: unlock, reload, sync)")

    def _respond(self, name: str, correlation_id: str | None, ok: bool, detail: str,
                 request: Message) -> None:
        response = CommandResponse(correlation_id=correlation_id, device=self.device_id,
                                   command=name[:256], ok=ok, detail=detail[:256], ts=utcnow()).to_bytes()
        self.client.publish(self.topics.command_response(self.device_id, name), response, qos=1)
        if request.response_topic:
            self.client.publish(request.response_topic, response, qos=1,
                                correlation_data=request.correlation_data)
