"""A door that only logs and records its state (tests, the demo, a kiosk without a relay)."""

from __future__ import annotations

from device.config import SimulatedDoorConfig
from device.door.base import Door


class SimulatedDoor(Door):
    """Records transitions in ``transitions``; drives nothing."""

    def __init__(self, unlock_seconds: float = 5.0) -> None:
        self.output = False  # what a relay would be doing
        super().__init__(unlock_seconds)

    @classmethod
    def from_config(cls, config: SimulatedDoorConfig) -> SimulatedDoor:
        """Build from the ``[door]`` section."""
        return cls(config.unlock_seconds)

    def _drive(self, unlocked: bool) -> None:
        self.output = unlocked

    def _release(self) -> None:
        """Nothing to free."""
