"""Door actuators: fail-secure (locked on start, error, exit), extending unlock window, GPIO."""

from __future__ import annotations

import sys
import threading
import time
import types
from typing import Any, ClassVar

import pytest

from device.config import GpioDoorConfig, SimulatedDoorConfig
from device.door import (
    DOORS,
    MAX_MANUAL_UNLOCK_S,
    DoorError,
    DoorSetupError,
    DoorState,
    GpioDoor,
    SimulatedDoor,
    create_door,
)

WAIT_S = 5.0


def wait_for(predicate: Any, timeout: float = WAIT_S) -> bool:
    """Poll until predicate() is true (not a timing assertion: only a generous bound against hangs)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())


def test_locked_on_start_unlocks_for_a_window_then_relocks() -> None:
    with create_door(SimulatedDoorConfig(unlock_seconds=0.05)) as door:
        assert isinstance(door, SimulatedDoor) and set(DOORS) == {"simulated", "gpio"}
        assert door.state is DoorState.LOCKED and not door.output
        door.grant()
        assert door.state is DoorState.UNLOCKED and door.output
        assert wait_for(lambda: door.state is DoorState.LOCKED)
        assert not door.output
        reasons = [(t.state, t.reason) for t in door.transitions]
        assert reasons == [(DoorState.LOCKED, "start"), (DoorState.UNLOCKED, "granted"),
                           (DoorState.LOCKED, "window ended")]
    assert door.state is DoorState.LOCKED and door.transitions[-1].reason == "exit"


def test_a_new_grant_extends_and_never_shortens() -> None:
    door = SimulatedDoor(unlock_seconds=30)
    door.grant(seconds=30)
    first = door.unlocked_until
    assert first is not None
    door.grant(seconds=1)  # shorter: keeps the longer window
    assert door.unlocked_until == first
    door.grant(seconds=60)
    later = door.unlocked_until
    assert later is not None and later > first
    door.lock("test")
    assert door.state is DoorState.LOCKED and door.unlocked_until is None
    door.close()
    door.close()
    assert door.transitions[-1].state is DoorState.LOCKED
    with pytest.raises(DoorError, match="closed"):
        door.grant()


def test_manual_unlock_is_bounded() -> None:
    with SimulatedDoor() as door:
        with pytest.raises(DoorError, match="refused"):
            door.manual_unlock(MAX_MANUAL_UNLOCK_S + 1)
        with pytest.raises(DoorError, match="refused"):
            door.manual_unlock(0)
        assert door.state is DoorState.LOCKED
        door.manual_unlock(10)
        assert door.state is DoorState.UNLOCKED and door.transitions[-1].reason == "manual"
    assert door.state is DoorState.LOCKED


class FlakyDoor(SimulatedDoor):
    """A relay whose driver fails when energised."""

    def _drive(self, unlocked: bool) -> None:
        if unlocked:
            raise OSError("relay driver I/O error")
        super()._drive(unlocked)


def test_an_output_error_leaves_the_door_locked() -> None:
    with FlakyDoor() as door:
        with pytest.raises(DoorError, match="relay driver"):
            door.grant()
        assert door.state is DoorState.LOCKED and not door.output and door.unlocked_until is None


def test_grants_from_many_threads_are_safe() -> None:
    with SimulatedDoor(unlock_seconds=0.02) as door:
        threads = [threading.Thread(target=lambda: [door.grant() for _ in range(50)]) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert wait_for(lambda: door.state is DoorState.LOCKED)


class FakeDigitalOutputDevice:
    """gpiozero.DigitalOutputDevice in the real API's shape (pin, active_high, initial_value)."""

    instances: ClassVar[list[FakeDigitalOutputDevice]] = []

    def __init__(self, pin: Any = None, *, active_high: bool = True, initial_value: Any = False,
                 pin_factory: Any = None) -> None:
        self.pin, self.active_high = pin, active_high
        self.value = int(bool(initial_value))
        self.history = [self.value]
        self.closed = False
        FakeDigitalOutputDevice.instances.append(self)

    @property
    def is_active(self) -> bool:
        return bool(self.value)

    def on(self) -> None:
        self.value = 1
        self.history.append(1)

    def off(self) -> None:
        self.value = 0
        self.history.append(0)

    def close(self) -> None:
        self.closed = True


def test_gpio_relay_through_gpiozero(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("gpiozero")
    module.DigitalOutputDevice = FakeDigitalOutputDevice  # type: ignore[attr-defined]
    module.OutputDevice = FakeDigitalOutputDevice  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "gpiozero", module)
    FakeDigitalOutputDevice.instances = []
    door = create_door(GpioDoorConfig(pin=22, unlock_seconds=30, active_high=False))
    assert isinstance(door, GpioDoor)
    relay = FakeDigitalOutputDevice.instances[0]
    assert (relay.pin, relay.active_high, relay.value) == (22, False, 0)
    door.grant()
    assert relay.is_active
    door.close()
    assert not relay.is_active and relay.closed and relay.history[0] == 0


def test_gpio_without_gpiozero_names_the_pi_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gpiozero", None)
    with pytest.raises(DoorSetupError, match=r"facegate\[pi\]"):
        GpioDoor(17)
