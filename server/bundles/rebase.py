"""When the gallery delta may shrink: every known door runs a bundle that already holds the adds.

A door serves *its bundle + the latest delta*, so dropping an add is safe only when every door's
bundle holds that person, and every bundle a door may still install does too. The doors' running
bundles come from the ``devices`` table (the audit subscriber writes ``bundle_sequence`` from each
door's retained ``bundle/ack`` and status); the bundles come from the bundles folder the ledger lives
in. The plan is:

* every device the server has seen must report a running bundle (one that never did blocks: it may
  serve nothing but the delta);
* the delta's ``bundle_sequence`` becomes the oldest running bundle N;
* every running bundle and every bundle folder from N on must have a gallery export record
  (``gallery_export.json``, written for bundles exported from the database); one without it (built
  from a ``--gallery`` folder, or not in this bundles folder) blocks;
* :meth:`server.bundles.delta.DeltaLedger.rebase` then drops an add only if all those galleries hold
  the person and were exported after the add. Tombstones stay.

:class:`DeltaRebaser` re-plans in its own thread at start-up and whenever a door's running bundle
changes (bursts of acks coalesce into one run); the rebase itself runs under the sync's lock and is a
no-op when nothing changes, so running it again is harmless. There is no "decommissioned" notion yet:
a door that is gone for good blocks rebasing until its ``devices`` row is deleted.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.bundle_layout import BUNDLE_JSON
from device.gallery.store import GalleryError, read_meta
from server.bundles.builder import export_persons, export_time
from server.bundles.delta import GalleryCoverage, MqttGallerySync
from server.db.models import Device
from server.db.session import Database

logger = logging.getLogger(__name__)

IDLE_POLL_S = 0.5  # how often an idle rebaser checks for stop
JOIN_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class RebasePlan:
    """Rebase onto ``bundle_sequence`` (the oldest running bundle) with these galleries' coverage."""

    bundle_sequence: int
    coverage: tuple[GalleryCoverage, ...]


def fleet_bundles(session: Session) -> dict[str, int | None]:
    """Every known device -> the bundle it last reported running (None: never reported one)."""
    rows = session.execute(select(Device.device_id, Device.bundle_sequence))
    return {device_id: sequence for device_id, sequence in rows}


class CoverageCache:
    """Gallery coverage of the bundles under ``root`` (bundle folders never change once built)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._known: dict[int, GalleryCoverage] = {}

    def sequences(self) -> set[int]:
        """Sequences of the bundle folders under ``root``."""
        if not self.root.is_dir():
            return set()
        return {int(p.name) for p in self.root.iterdir()
                if p.name.isdigit() and (p / BUNDLE_JSON).is_file()}

    def get(self, sequence: int) -> GalleryCoverage | None:
        """Bundle ``sequence``'s coverage; None without a folder, an export record or a readable gallery."""
        if sequence in self._known:
            return self._known[sequence]
        folder = self.root / str(sequence)
        exported_at = export_time(folder)
        if exported_at is None:
            return None
        persons = export_persons(folder)  # a sealed gallery is not readable here
        if persons is None:
            try:
                persons = frozenset(read_meta(folder / "gallery").persons)
            except GalleryError as exc:
                logger.warning("bundle %d: gallery unreadable (%s); it blocks delta rebasing", sequence, exc)
                return None
        coverage = GalleryCoverage(sequence, exported_at, persons)
        self._known[sequence] = coverage
        return coverage


def plan(fleet: dict[str, int | None], cache: CoverageCache) -> RebasePlan | str:
    """The rebase the fleet allows, or why there is none."""
    if not fleet:
        return "no door is known yet"
    unbundled = sorted(d for d, s in fleet.items() if not s)
    if unbundled:
        return f"{len(unbundled)} door(s) report no running bundle (e.g. {unbundled[0]})"
    running = {s for s in fleet.values() if s}
    oldest = min(running)
    coverage: list[GalleryCoverage] = []
    for sequence in sorted(running | {s for s in cache.sequences() if s >= oldest}):
        found = cache.get(sequence)
        if found is None:
            return f"bundle {sequence} has no gallery export record (built from a --gallery folder or " \
                   f"not in {cache.root})"
        coverage.append(found)
    return RebasePlan(oldest, tuple(coverage))


class DeltaRebaser:
    """Rebases the sync's delta when the fleet allows it; :meth:`request` from any thread to re-check."""

    def __init__(self, db: Database, sync: MqttGallerySync, root: Path) -> None:
        self.db = db
        self.sync = sync
        self.cache = CoverageCache(root)
        self.last_reason = ""  # why the last check did not rebase (for operators and tests)
        self.checks = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def rebase_now(self) -> int | None:
        """Check the fleet once; return the published delta sequence, or None when nothing changed."""
        with self.db.session() as session:
            fleet = fleet_bundles(session)
        found = plan(fleet, self.cache)
        self.checks += 1
        if isinstance(found, str):
            self.last_reason = found
            logger.debug("gallery delta not rebased: %s", found)
            return None
        self.last_reason = ""
        return self.sync.rebase(found.bundle_sequence, found.coverage)

    def request(self, _devices: object = None) -> None:
        """Ask for a re-check soon (called after acks that change a door's running bundle)."""
        self._wake.set()

    def start(self) -> DeltaRebaser:
        """Start the worker; it checks once at once (the fleet may have moved while we were down)."""
        with self._lock:
            if self._thread is None:
                self._wake.set()
                self._thread = threading.Thread(target=self._run, name="delta-rebaser", daemon=True)
                self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._wake.wait(IDLE_POLL_S):
                continue
            self._wake.clear()
            try:
                self.rebase_now()
            except Exception:
                logger.exception("gallery delta rebase failed; retrying at the next ack")

    def close(self) -> None:
        """Stop the worker (safe to call twice)."""
        self._stop.set()
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(JOIN_TIMEOUT_S)
