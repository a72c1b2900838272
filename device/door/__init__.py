"""Door actuators, chosen by ``[door] type``: ``simulated`` or ``gpio``. All are fail-secure."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from device.config import DoorConfig
from device.door.base import (
    MAX_MANUAL_UNLOCK_S,
    Door,
    DoorError,
    DoorSetupError,
    DoorState,
    Transition,
)
from device.door.gpio import GpioDoor
from device.door.simulated import SimulatedDoor

DOORS: dict[str, Callable[[Any], Door]] = {
    "simulated": SimulatedDoor.from_config,
    "gpio": GpioDoor.from_config,
}


def create_door(config: DoorConfig) -> Door:
    """Instantiate the actuator the config names (locked from the start)."""
    try:
        factory = DOORS[config.type]
    except KeyError as exc:
        raise DoorSetupError(f"unknown door type {config.type!r}; known: {sorted(DOORS)}") from exc
    return factory(config)


__all__ = [
    "DOORS",
    "MAX_MANUAL_UNLOCK_S",
    "Door",
    "DoorError",
    "DoorSetupError",
    "DoorState",
    "GpioDoor",
    "SimulatedDoor",
    "Transition",
    "create_door",
]
