"""A door that only logs and records its state (tests, the demo, a kiosk without a relay).

With ``state_file`` the relay's output is mirrored into a small JSON file on every change, atomically:
like a real relay it outlives the process, so a test can see what a killed agent left the door in and
what the next start drives it to, before anything else happens.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from core.files import atomic_write_bytes
from device.config import SimulatedDoorConfig
from device.door.base import Door


class SimulatedDoor(Door):
    """Records transitions in ``transitions``; drives nothing (or the ``state_file``)."""

    def __init__(self, unlock_seconds: float = 5.0, state_file: Path | None = None) -> None:
        self.output = False  # what a relay would be doing
        self.state_file = state_file
        super().__init__(unlock_seconds)

    @classmethod
    def from_config(cls, config: SimulatedDoorConfig) -> SimulatedDoor:
        """Build from the ``[door]`` section."""
        return cls(config.unlock_seconds, config.state_file)

    def _drive(self, unlocked: bool) -> None:
        if self.state_file is not None:
            record = {"output": "unlocked" if unlocked else "locked", "pid": os.getpid(), "time": time.time()}
            atomic_write_bytes(self.state_file, json.dumps(record).encode("utf-8"))
        self.output = unlocked

    def _release(self) -> None:
        """Nothing to free."""


def read_state_file(path: Path) -> dict[str, object] | None:
    """What a simulated door's ``state_file`` says (output, pid, time), or None when it does not exist."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    return data if isinstance(data, dict) else None
