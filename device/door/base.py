"""Fail-secure door actuator: locked on start, on error and on close; unlocks only for a window.

A grant or a manual unlock opens the door until ``now + seconds``; a later grant extends the window,
never shortens it. A timer thread relocks when the window ends. If driving the output fails, the
door tries to lock, records ``fault`` when even that fails, and raises ``DoorError``. A door in
``fault`` refuses every unlock until a lock succeeds again. Every transition is recorded and handed to
the listeners (the agent turns a fault into a ``door_fault`` event).
Thread-safe: the frame loop grants while the MQTT thread may unlock manually.
"""

from __future__ import annotations

import abc
import enum
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

logger = logging.getLogger(__name__)

# Transitions kept in memory for status and tests; older ones are only in the logs.
HISTORY = 256
# Manual unlocks are capped so a bad command cannot prop the door open for hours.
MAX_MANUAL_UNLOCK_S = 600.0


class DoorState(enum.StrEnum):
    """What the actuator is doing."""

    LOCKED = "locked"
    UNLOCKED = "unlocked"
    FAULT = "fault"


class DoorError(Exception):
    """The actuator could not be driven (the door is left locked when at all possible)."""


class DoorSetupError(DoorError):
    """The actuator cannot be created (missing package, no GPIO)."""


@dataclass(frozen=True, slots=True)
class Transition:
    """One state change: wall-clock time, monotonic time, new state and why."""

    wall_time: float
    monotonic: float
    state: DoorState
    reason: str


TransitionListener = Callable[[Transition], None]


class Door(abc.ABC):
    """Timed, fail-secure door; subclasses only drive the output. Context manager, close() idempotent."""

    def __init__(self, unlock_seconds: float) -> None:
        self.unlock_seconds = unlock_seconds
        self._cond = threading.Condition()
        self._state = DoorState.LOCKED
        self._until: float | None = None
        self._closed = False
        self._history: deque[Transition] = deque(maxlen=HISTORY)
        self._listeners: list[TransitionListener] = []
        self._set(False, "start", force=True)  # fail-secure: locked before anything else happens
        self._timer = threading.Thread(target=self._run, name="door-timer", daemon=True)
        self._timer.start()

    @abc.abstractmethod
    def _drive(self, unlocked: bool) -> None:
        """Set the physical output (True = unlocked)."""

    @abc.abstractmethod
    def _release(self) -> None:
        """Free the hardware (called once, after the final lock)."""

    # ---------------------------------------------------------------- state
    @property
    def state(self) -> DoorState:
        """Current state."""
        return self._state

    @property
    def unlocked_until(self) -> float | None:
        """Monotonic time at which the open window ends, or None when locked."""
        return self._until

    @property
    def transitions(self) -> list[Transition]:
        """Recent transitions, oldest first."""
        with self._cond:
            return list(self._history)

    def _set(self, unlocked: bool, reason: str, force: bool = False) -> None:
        """Drive the output and record it; on failure lock, record a fault and raise DoorError."""
        try:
            self._drive(unlocked)
        except Exception as exc:  # any driver failure must end in a locked (or fault) state
            self._until = None
            state = DoorState.LOCKED
            if unlocked:
                try:
                    self._drive(False)
                except Exception:
                    state = DoorState.FAULT
            else:
                state = DoorState.FAULT
            self._record(state, f"error while {reason}: {exc}")
            raise DoorError(f"door output failed while {reason}: {exc}") from exc
        new = DoorState.UNLOCKED if unlocked else DoorState.LOCKED
        if new is not self._state or force:
            self._record(new, reason)

    def _record(self, state: DoorState, reason: str) -> None:
        self._state = state
        transition = Transition(time.time(), time.monotonic(), state, reason)
        self._history.append(transition)
        log = logger.error if state is DoorState.FAULT else logger.info
        log("door %s (%s)", state.value, reason)
        for listener in self._listeners:
            try:
                listener(transition)
            except Exception:  # a listener must never keep the door from locking
                logger.exception("door transition listener failed")

    def add_listener(self, listener: TransitionListener) -> None:
        """Call ``listener`` with every later transition (under the door's lock: be quick, never call
        the door)."""
        with self._cond:
            self._listeners.append(listener)

    # ---------------------------------------------------------------- commands
    def _open_for(self, seconds: float, reason: str) -> None:
        with self._cond:
            if self._closed:
                raise DoorError("door is closed")
            if self._state is DoorState.FAULT:
                raise DoorError(f"door is in fault ({self._history[-1].reason}); it stays locked until a "
                                "lock succeeds: check the relay and restart the agent")
            until = time.monotonic() + seconds
            self._until = max(until, self._until or until)
            self._set(True, reason)
            self._cond.notify_all()

    def grant(self, seconds: float | None = None, reason: str = "granted") -> None:
        """Unlock for ``seconds`` (default: the configured window), extending an open window."""
        self._open_for(self.unlock_seconds if seconds is None else seconds, reason)

    def manual_unlock(self, seconds: float | None = None, reason: str = "manual") -> float:
        """Operator unlock (MQTT command); capped at MAX_MANUAL_UNLOCK_S; returns the seconds opened."""
        wanted = self.unlock_seconds if seconds is None else seconds
        if not 0 < wanted <= MAX_MANUAL_UNLOCK_S:
            raise DoorError(f"manual unlock of {wanted} s refused: must be in (0, {MAX_MANUAL_UNLOCK_S}]")
        self._open_for(wanted, reason)
        return wanted

    def lock(self, reason: str = "lock") -> None:
        """Lock now and cancel any open window."""
        with self._cond:
            self._until = None
            if not self._closed:
                self._set(False, reason)
            self._cond.notify_all()

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                if self._until is None:
                    self._cond.wait()
                    continue
                remaining = self._until - time.monotonic()
                if remaining > 0:
                    self._cond.wait(remaining)
                    continue
                self._until = None
                try:
                    self._set(False, "window ended")
                except DoorError as exc:
                    logger.error("relock failed: %s", exc)

    def close(self) -> None:
        """Lock, stop the timer and release the hardware; safe to call twice."""
        with self._cond:
            if self._closed:
                return
            self._until = None
            try:
                self._set(False, "exit", force=True)
            except DoorError as exc:
                logger.error("lock on exit failed: %s", exc)
            self._closed = True
            self._cond.notify_all()
        self._timer.join(timeout=1.0)
        self._release()

    def __enter__(self) -> Door:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
