"""Home Assistant MQTT discovery: a lock for the door, an event entity for decisions, a few sensors.

Every config is retained and names the device's availability topic, so Home Assistant marks the
entities unavailable when the broker publishes the device's last will (``offline``).
"""

from __future__ import annotations

import json
import re
from typing import Any

from core.protocol.topics import Topics, ha_config_topic
from core.types import DecisionKind

DECISION_TYPES = [kind.value for kind in DecisionKind]
# Home Assistant accepts [a-zA-Z0-9_-] in node and object ids.
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
# An entity id's object part is lower-case [a-z0-9_] ("<domain>.<object>").
_NOT_ENTITY = re.compile(r"[^a-z0-9_]")

# HA's lock sends "LOCK"/"UNLOCK"; the template wraps it into our CommandRequest JSON, stamped with HA's
# `now()` (the device refuses commands without a fresh `ts`) and a correlation id for the event.
LOCK_COMMAND_TEMPLATE = (
    '{"schema_version": 1, "action": "{{ value }}", "requested_by": "homeassistant", '
    '"correlation_id": "ha-{{ (now().timestamp() * 1000) | int }}", "ts": "{{ now().isoformat() }}"}'
)
# "liveness off" and an acknowledged low tau, as Home Assistant shows them ("none" when all is safe).
WARNINGS_TEMPLATE = "{{ (value_json.warnings | join('; '))[:255] if value_json.warnings else 'none' }}"
EVENT_VALUE_TEMPLATE = (
    "{{ {'event_type': value_json.decision, 'person_id': value_json.person_id, 'name': value_json.name, "
    "'score': value_json.score, 'event_id': value_json.event_id} | to_json }}"
)


def node_id(device_id: str) -> str:
    """Discovery node id: the device id (the broker ACL lets a device write only its own configs)."""
    return _UNSAFE.sub("_", device_id)


def discovery_configs(topics: Topics, device_id: str,
                      software_version: str) -> list[tuple[str, dict[str, Any]]]:
    """(config topic, config) for every entity of one device."""
    node = node_id(device_id)
    unique = _UNSAFE.sub("_", f"facegate_{topics.site}_{device_id}")
    device = {
        "identifiers": [unique],
        "name": f"facegate {device_id}",
        "manufacturer": "facegate",
        "model": "door kiosk",
        "sw_version": software_version,
        "suggested_area": topics.site,
    }
    common = {
        "device": device,
        "availability": [{"topic": topics.available(device_id), "payload_available": "online",
                          "payload_not_available": "offline"}],
    }
    status = topics.status(device_id)
    events = topics.events(device_id)
    entities: list[tuple[str, str, dict[str, Any]]] = [
        ("lock", "door", {
            "name": "Door",
            "command_topic": topics.command(device_id, "unlock"),
            "command_template": LOCK_COMMAND_TEMPLATE,
            "payload_lock": "LOCK",
            "payload_unlock": "UNLOCK",
            "state_topic": status,
            "value_template": "{{ value_json.door }}",
            "state_locked": "locked",
            "state_unlocked": "unlocked",
            "state_jammed": "fault",  # the relay could not be driven: HA shows the lock as jammed
            "optimistic": False,
            "qos": 1,
        }),
        ("event", "access", {
            "name": "Access",
            "state_topic": events,
            "event_types": DECISION_TYPES,
            "value_template": EVENT_VALUE_TEMPLATE,
            "icon": "mdi:face-recognition",
            "qos": 1,
        }),
        ("sensor", "last_person", {
            "name": "Last person",
            "state_topic": events,
            "value_template": "{{ value_json.name if value_json.name else value_json.decision }}",
            "json_attributes_topic": events,
            "json_attributes_template": "{{ {'decision': value_json.decision, 'score': value_json.score, "
                                        "'ts': value_json.ts} | to_json }}",
            "icon": "mdi:account",
        }),
        ("sensor", "fps", {
            "name": "Frame rate",
            "state_topic": status,
            "value_template": "{{ value_json.fps }}",
            "unit_of_measurement": "fps",
            "state_class": "measurement",
            "entity_category": "diagnostic",
        }),
        ("sensor", "liveness", {
            "name": "Liveness",
            "state_topic": status,
            "value_template": "{{ value_json.liveness }}",
            "entity_category": "diagnostic",
            "icon": "mdi:shield-account",
        }),
        ("sensor", "security_warnings", {
            "name": "Security warnings",
            "state_topic": status,
            "value_template": WARNINGS_TEMPLATE,
            "entity_category": "diagnostic",
            "icon": "mdi:shield-alert",
        }),
        ("sensor", "model_version", {
            "name": "Model version",
            "state_topic": status,
            "value_template": "{{ value_json.versions.model }}",
            "entity_category": "diagnostic",
            "icon": "mdi:brain",
        }),
        ("sensor", "outbox_depth", {
            "name": "Outbox depth",
            "state_topic": status,
            "value_template": "{{ value_json.outbox_depth }}",
            "state_class": "measurement",
            "entity_category": "diagnostic",
        }),
    ]
    out = []
    for component, obj, extra in entities:
        # default_entity_id ("<domain>.<id>") replaces object_id (deprecated in HA 2025.10,
        # ignored from 2026.4).
        entity = _NOT_ENTITY.sub("_", f"{unique}_{obj}".lower())
        config = {**extra, **common, "unique_id": f"{unique}_{obj}",
                  "default_entity_id": f"{component}.{entity}"}
        out.append((ha_config_topic(component, node, obj), config))
    return out


def encode(config: dict[str, Any]) -> bytes:
    """JSON bytes of one discovery config."""
    return json.dumps(config, separators=(",", ":")).encode("utf-8")
