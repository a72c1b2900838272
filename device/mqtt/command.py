"""Sending a command to a door over MQTT and waiting for its answer (``facegate device unlock``).

The request carries a fresh ``ts`` and a correlation id, is never retained, and the answer is matched on
the correlation id on ``…/<device>/cmd/<name>/response``. The door records the opening as a
``manual_unlock`` event in its outbox (see :mod:`device.mqtt.service`).
"""

from __future__ import annotations

import logging
import queue
import uuid

from core.mqtt.client import ClientSettings, Message, MqttClient
from core.protocol.schemas import CommandRequest, CommandResponse, PayloadError, utcnow
from core.protocol.topics import Topics
from device.config import DeviceConfig

logger = logging.getLogger(__name__)


class CommandFailed(Exception):
    """No answer came back (broker unreachable, door offline, or the ACL refused the publish)."""


def send_command(config: DeviceConfig, name: str, request: CommandRequest,
                 timeout_s: float) -> CommandResponse:
    """Publish ``request`` to the door's ``cmd/<name>/set`` and return its answer (CommandFailed on none)."""
    if not config.mqtt.enabled:
        raise CommandFailed("this door has [mqtt] enabled = false: commands reach a door only through its "
                            "broker")
    topics = Topics(config.mqtt.prefix, config.device.site)
    device = config.device.id
    wanted = request.correlation_id
    answers: queue.Queue[CommandResponse] = queue.Queue()

    def on_response(message: Message) -> None:
        try:
            response = CommandResponse.parse(message.payload)
        except PayloadError as exc:
            logger.debug("ignoring a malformed response: %s", exc)
            return
        if response.correlation_id == wanted:
            answers.put(response)

    client_id = f"facegate-cli-{config.device.site}-{device}-{uuid.uuid4().hex[:8]}"
    client = MqttClient(ClientSettings.from_config(config.mqtt, client_id))
    client.subscribe(topics.command_response(device, name), on_response)  # subscribed on connect
    with client.start():
        if not client.wait_connected(timeout_s):
            raise CommandFailed(f"cannot connect to the broker {config.mqtt.host}:{config.mqtt.port}")
        client.publish(topics.command(device, name), request.to_bytes(), qos=1, retain=False)
        try:
            return answers.get(timeout=timeout_s)
        except queue.Empty:
            raise CommandFailed(f"{device} did not answer within {timeout_s:g} s (is it running and online? "
                                "may this client publish commands under the broker's ACL?)") from None


def send_unlock(config: DeviceConfig, seconds: float | None, requested_by: str,
                timeout_s: float) -> CommandResponse:
    """Ask the door to unlock for ``seconds`` (None: its default) on behalf of ``requested_by``."""
    request = CommandRequest(correlation_id=f"cli-{uuid.uuid4().hex[:12]}", ts=utcnow(), seconds=seconds,
                             requested_by=requested_by[:256])
    return send_command(config, "unlock", request, timeout_s)
