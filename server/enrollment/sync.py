"""How enrollment and deletion reach the doors: gallery deltas (add/remove), behind a small Protocol.

The MQTT implementation lives with the bundle code (``server.bundles``); :class:`NullSync` is used when
MQTT is disabled, in which case deletions stay pending for every known device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from core.types import FloatArray


class SyncError(Exception):
    """A gallery delta could not be built, signed or published."""


@dataclass(frozen=True, slots=True)
class GalleryEntry:
    """One template to add on the doors."""

    template_id: str
    person_id: str
    name: str
    vector: FloatArray


class GallerySync(Protocol):
    """Publishes gallery deltas; each call returns the delta's sequence number, or None if not sent."""

    def publish_add(self, model_sha256: str, entries: list[GalleryEntry]) -> int | None:
        """Send templates to add."""
        ...

    def publish_remove(self, model_sha256: str, person_id: str, template_ids: list[str]) -> int | None:
        """Send a removal of one person's templates."""
        ...

    def close(self) -> None:
        """Release the connection (idempotent)."""
        ...


class NullSync:
    """No broker: nothing is published."""

    def publish_add(self, model_sha256: str, entries: list[GalleryEntry]) -> int | None:
        """Publish nothing."""
        return None

    def publish_remove(self, model_sha256: str, person_id: str, template_ids: list[str]) -> int | None:
        """Publish nothing."""
        return None

    def close(self) -> None:
        """Nothing to release."""
