"""Token-bucket rate limiting per key (user, or user+address for logins), in memory, thread-safe."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

MAX_KEYS = 100_000  # forget idle buckets beyond this many keys so memory stays bounded


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class TokenBucket:
    """``burst`` requests at once, refilled at ``per_minute / 60`` per second, per key."""

    def __init__(self, per_minute: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """Consume one token; return 0.0 when allowed, else the seconds until one is available."""
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                if len(self._buckets) >= MAX_KEYS:
                    self._evict(now)
                bucket = self._buckets[key] = _Bucket(self.burst, now)
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return 0.0
            return (1.0 - bucket.tokens) / self.rate

    def refund(self, key: str) -> None:
        """Give back the token a :meth:`take` consumed (e.g. a login that succeeded)."""
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is not None:
                bucket.tokens = min(self.burst, bucket.tokens + 1.0)

    def _evict(self, now: float) -> None:
        full_after = self.burst / self.rate
        stale = [k for k, b in self._buckets.items() if now - b.updated >= full_after]
        for key in stale:
            del self._buckets[key]
        if len(self._buckets) >= MAX_KEYS:
            self._buckets.clear()


MAX_NAMES = 10  # user names kept per summary row


@dataclass(slots=True)
class _Failures:
    pending: int
    names: set[str]
    written: float


class FailureAggregator:
    """Failures per key (a client address), summarised: the first one is reported at once, then at most
    one report per ``window_s`` carrying the count since the last one (not one audit row per failure)."""

    def __init__(self, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._keys: dict[str, _Failures] = {}
        self._lock = threading.Lock()

    def note(self, key: str, name: str) -> tuple[int, list[str]] | None:
        """Count one failure for ``key``; return (failures, user names) to report now, else None."""
        now = self._clock()
        with self._lock:
            entry = self._keys.get(key)
            if entry is None:
                if len(self._keys) >= MAX_KEYS:
                    self._keys = {k: e for k, e in self._keys.items() if e.pending}
                entry = self._keys[key] = _Failures(0, set(), now - self.window_s)
            entry.pending += 1
            if len(entry.names) < MAX_NAMES:
                entry.names.add(name[:64])
            if now - entry.written < self.window_s:
                return None
            report = (entry.pending, sorted(entry.names))
            entry.pending, entry.names, entry.written = 0, set(), now
            return report
