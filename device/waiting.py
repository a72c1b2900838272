"""Waits that follow progress, not the wall clock.

A door is a small, often busy machine: a wait that only holds on an idle PC is a bug. So a wait here
gives up only when nothing moved for ``stall_s`` seconds, where "moved" is whatever the caller can
observe (chunks received, acks, events stored), and the error names what it waited for and how far
it got. A slow machine that keeps making progress is never failed; a dead peer still is.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable

# How often a wait looks again (cheap predicates only: counters, flags).
POLL_S = 0.05


class WaitTimeout(TimeoutError):
    """Nothing moved toward what a wait waited for; the message names it and the last progress."""


def wait_progress(done: Callable[[], bool], what: str, *, stall_s: float,
                  progress: Callable[[], Hashable] | None = None, poll_s: float = POLL_S,
                  sleep: Callable[[float], object] = time.sleep) -> None:
    """Block until ``done()``; raise :class:`WaitTimeout` naming ``what`` once ``progress()`` has not
    changed for ``stall_s`` seconds (without ``progress``: once ``stall_s`` seconds passed)."""
    marker = progress() if progress is not None else None
    moved = time.monotonic()
    while not done():
        now = time.monotonic()
        if progress is not None:
            current = progress()
            if current != marker:
                marker, moved = current, now
        if now - moved >= stall_s:
            if done():
                return
            shown = f"; last progress: {marker}" if progress is not None else ""
            raise WaitTimeout(f"timed out waiting for {what}: nothing moved for {stall_s:.0f} s{shown}")
        sleep(poll_s)
