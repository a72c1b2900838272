"""Every MQTT topic facegate uses is built here, and only here.

Layout: ``<prefix>/<site>/<device>/<leaf>`` for per-device topics and
``<prefix>/<site>/bundles/...`` for fleet-wide bundle traffic. Subscribers match with
``paho.mqtt.client.topic_matches_sub`` against the filters below.
"""

from __future__ import annotations

from dataclasses import dataclass

SEGMENT_FORBIDDEN = frozenset("+#/\x00")


class TopicError(ValueError):
    """A topic segment contains MQTT wildcard or separator characters."""


def _segment(value: str, what: str) -> str:
    if not value or any(ch in SEGMENT_FORBIDDEN for ch in value):
        raise TopicError(f"{what} {value!r} must be non-empty and contain none of '+', '#', '/', NUL")
    return value


@dataclass(frozen=True, slots=True)
class Topics:
    """Topic builders for one prefix and site."""

    prefix: str = "facegate"
    site: str = "site"

    def __post_init__(self) -> None:
        _segment(self.prefix, "prefix")
        _segment(self.site, "site")

    @property
    def base(self) -> str:
        """``<prefix>/<site>``."""
        return f"{self.prefix}/{self.site}"

    def device(self, device_id: str) -> str:
        """Root of one device's topics."""
        return f"{self.base}/{_segment(device_id, 'device id')}"

    def available(self, device_id: str) -> str:
        """``online``/``offline``, retained, with the last will."""
        return f"{self.device(device_id)}/available"

    def status(self, device_id: str) -> str:
        """Retained status JSON."""
        return f"{self.device(device_id)}/status"

    def events(self, device_id: str) -> str:
        """Access decisions, QoS 1."""
        return f"{self.device(device_id)}/events"

    def events_confirm(self, device_id: str) -> str:
        """Server -> device: receipts for stored events (``EventConfirm``)."""
        return f"{self.events(device_id)}/confirm"

    def snapshot(self, device_id: str) -> str:
        """Opt-in JPEG snapshots of unknown/spoof events."""
        return f"{self.device(device_id)}/snapshot"

    def command(self, device_id: str, name: str) -> str:
        """A command to a device (unlock, reload, sync, ...)."""
        return f"{self.device(device_id)}/cmd/{_segment(name, 'command')}/set"

    def command_response(self, device_id: str, name: str) -> str:
        """Where a device answers a command, with the correlation id."""
        return f"{self.device(device_id)}/cmd/{_segment(name, 'command')}/response"

    def bundle_ack(self, device_id: str) -> str:
        """Per-device bundle progress/acks (downloading N%, installed, rejected: reason)."""
        return f"{self.device(device_id)}/bundle/ack"

    def bundle_chunk_reply(self, device_id: str) -> str:
        """Chunks sent to one device in answer to its ChunkRequest."""
        return f"{self.device(device_id)}/bundle/chunk"

    @property
    def bundle_announce(self) -> str:
        """Retained signed manifest announcement."""
        return f"{self.base}/bundles/announce"

    def bundle_chunk(self, sequence: int) -> str:
        """Chunks of bundle ``sequence``."""
        return f"{self.base}/bundles/{sequence}/chunk"

    def bundle_request(self, device_id: str) -> str:
        """A device asks for missing chunks on its own topic (the broker ACL lets only it write there)."""
        return f"{self.device(device_id)}/bundle/request"

    @property
    def all_bundle_requests(self) -> str:
        """Filter for every device's chunk requests."""
        return f"{self.base}/+/bundle/request"

    @property
    def gallery_delta(self) -> str:
        """Signed gallery add/remove deltas (no models resent)."""
        return f"{self.base}/bundles/delta"

    # Subscription filters
    @property
    def all_events(self) -> str:
        """Filter for every device's events."""
        return f"{self.base}/+/events"

    @property
    def all_available(self) -> str:
        """Filter for every device's availability."""
        return f"{self.base}/+/available"

    @property
    def all_status(self) -> str:
        """Filter for every device's status."""
        return f"{self.base}/+/status"

    @property
    def all_bundle_acks(self) -> str:
        """Filter for every device's bundle acks."""
        return f"{self.base}/+/bundle/ack"

    @property
    def all_bundle_chunks(self) -> str:
        """Filter for the broadcast chunks of every bundle sequence."""
        return f"{self.base}/bundles/+/chunk"

    @property
    def all_events_confirms(self) -> str:
        """Filter for the server's receipts to every device."""
        return f"{self.base}/+/events/confirm"

    @property
    def all_commands(self) -> str:
        """Filter for the commands to every device."""
        return f"{self.base}/+/cmd/+/set"

    @property
    def all_command_responses(self) -> str:
        """Filter for every device's command responses."""
        return f"{self.base}/+/cmd/+/response"

    @property
    def all_bundle_chunk_replies(self) -> str:
        """Filter for the chunks re-sent to every device on request."""
        return f"{self.base}/+/bundle/chunk"

    @property
    def all_snapshots(self) -> str:
        """Filter for every device's opt-in snapshots."""
        return f"{self.base}/+/snapshot"

    @property
    def bridge_state(self) -> str:
        """The site bridge's connection state (``1``/``0``, retained; mosquitto's bridge notification).
        ``bridge`` is therefore reserved as a device id, like ``bundles``."""
        return f"{self.base}/bridge/state"

    def commands_filter(self, device_id: str) -> str:
        """Filter for the commands of one device."""
        return f"{self.device(device_id)}/cmd/+/set"

    def command_of(self, topic: str, device_id: str) -> str | None:
        """The command name in ``<device>/cmd/<name>/set``, or None for any other topic."""
        root = f"{self.device(device_id)}/cmd/"
        if not topic.startswith(root) or not topic.endswith("/set"):
            return None
        name = topic[len(root):-len("/set")]
        return name if name and "/" not in name else None

    @staticmethod
    def device_of(topic: str) -> str | None:
        """The device id in a per-device topic (third segment), or None."""
        parts = topic.split("/")
        return parts[2] if len(parts) >= 4 else None


HA_DISCOVERY_PREFIX = "homeassistant"
HA_STATUS_TOPIC = f"{HA_DISCOVERY_PREFIX}/status"


def ha_config_topic(component: str, node_id: str, object_id: str) -> str:
    """Home Assistant discovery config topic."""
    node, obj = _segment(node_id, "node"), _segment(object_id, "object")
    return f"{HA_DISCOVERY_PREFIX}/{component}/{node}/{obj}/config"
