"""A relay on a GPIO pin driven through gpiozero's ``DigitalOutputDevice`` (imported lazily).

``initial_value=False`` keeps the relay de-energised (locked) from the moment the pin is claimed.
With ``active_high=False`` the relay board is driven low to unlock (common opto-isolated boards).
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from device.config import GpioDoorConfig
from device.door.base import Door, DoorSetupError

logger = logging.getLogger(__name__)

GPIOZERO_HINT = ("gpiozero is not installed: on Raspberry Pi OS `apt install python3-gpiozero` and create "
                 "the venv with --system-site-packages (or pip install 'facegate[pi]')")


class GpioDoor(Door):
    """Relay output: on = unlocked."""

    def __init__(self, pin: int, unlock_seconds: float = 5.0, active_high: bool = True) -> None:
        try:
            gpiozero = importlib.import_module("gpiozero")
        except ImportError as exc:
            raise DoorSetupError(GPIOZERO_HINT) from exc
        try:
            self._device: Any = gpiozero.DigitalOutputDevice(
                pin, active_high=active_high, initial_value=False
            )
        except Exception as exc:  # gpiozero raises its own GPIOZeroError family (pin in use, no factory)
            raise DoorSetupError(f"cannot claim GPIO pin {pin} for the door relay: {exc}") from exc
        self.pin = pin
        super().__init__(unlock_seconds)

    @classmethod
    def from_config(cls, config: GpioDoorConfig) -> GpioDoor:
        """Build from the ``[door]`` section."""
        return cls(config.pin, config.unlock_seconds, config.active_high)

    def _drive(self, unlocked: bool) -> None:
        if unlocked:
            self._device.on()
        else:
            self._device.off()

    def _release(self) -> None:
        try:
            self._device.close()
        except Exception as exc:  # releasing must never raise out of cleanup
            logger.warning("GPIO pin %d close failed: %s", self.pin, exc)
