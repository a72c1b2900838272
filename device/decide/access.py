"""Authorisation above recognition: may a recognised person enter *now* (the ``[access]`` section)?

Recognition says who is at the door; this policy says whether that person may come in. The decision
engine asks it only once the k-of-n vote would grant, and turns a refusal into a ``denied`` decision
that names the person and carries the :class:`DenyReason`:

- ``blocked``: the person is listed in ``blocked`` (a suspended badge); refused at any time;
- ``outside_schedule``: the schedule is not empty, the person is not in ``always_allowed`` and no
  window contains the current local time.

Windows are wall-clock times in ``timezone`` (an IANA zone, DST-aware; default: the system's local
zone as the C library sees it, so ``TZ`` applies). A window covers ``[start, end)`` on each listed day;
an ``overnight`` window starts on a listed day and ends at ``end`` on the following day, so
``days = ["fri"], start = "22:00", end = "06:00", overnight = true`` is Friday night to Saturday 06:00.
The clock is injectable for tests.
"""

from __future__ import annotations

import enum
import time
import zoneinfo
from collections.abc import Callable
from datetime import datetime

from device.config import WEEKDAYS, AccessConfig, AccessWindow

Clock = Callable[[], float]


class DenyReason(enum.StrEnum):
    """Why a recognised person was refused (the ``reason`` of a ``denied`` event)."""

    BLOCKED = "blocked"
    OUTSIDE_SCHEDULE = "outside_schedule"


def _in_window(window: AccessWindow, weekday: int, minute: float) -> bool:
    """True when local ``weekday`` (0 = Monday) at ``minute`` after midnight falls in ``window``."""
    today, yesterday = WEEKDAYS[weekday], WEEKDAYS[(weekday - 1) % 7]
    start, end = window.start_minute, window.end_minute
    if not window.overnight:
        return today in window.days and start <= minute < end
    # Overnight: the evening part on a listed day, or the morning part after a listed day.
    return (today in window.days and minute >= start) or (yesterday in window.days and minute < end)


class AccessPolicy:
    """Checks a recognised person against the blocked list, the exemptions and the weekly schedule."""

    def __init__(self, config: AccessConfig, clock: Clock = time.time) -> None:
        self.config = config
        self._clock = clock
        self._zone = zoneinfo.ZoneInfo(config.timezone) if config.timezone else None
        self._blocked = frozenset(config.blocked)
        self._always = frozenset(config.always_allowed)

    @property
    def restricts(self) -> bool:
        """True when the policy can refuse anyone (a block list or a schedule is configured)."""
        return bool(self._blocked or self.config.schedule)

    def local_time(self, at: float | None = None) -> datetime:
        """Wall-clock time in the policy's zone at epoch ``at`` (default: the clock's now)."""
        now = self._clock() if at is None else at
        if self._zone is None:
            return datetime.fromtimestamp(now).astimezone()  # the system zone, DST included
        return datetime.fromtimestamp(now, self._zone)

    def in_schedule(self, at: float | None = None) -> bool:
        """True when the schedule is empty or a window contains the local time at ``at`` (default now)."""
        if not self.config.schedule:
            return True
        local = self.local_time(at)
        minute = local.hour * 60 + local.minute + (local.second + local.microsecond / 1e6) / 60.0
        return any(_in_window(w, local.weekday(), minute) for w in self.config.schedule)

    def check(self, person_id: str, at: float | None = None) -> DenyReason | None:
        """None when ``person_id`` may enter at ``at`` (default now), else why not."""
        if person_id in self._blocked:
            return DenyReason.BLOCKED
        if person_id in self._always or self.in_schedule(at):
            return None
        return DenyReason.OUTSIDE_SCHEDULE
