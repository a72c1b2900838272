"""The working gallery: a bundle's gallery plus the latest gallery delta, rebuilt from scratch each time.

Deltas are cumulative (every add since the bundle, every removal ever), so the working copy is always
``bundle gallery + delta`` computed afresh: applying the same delta twice, or a crash halfway, cannot
duplicate or lose anything. A ``built.json`` marker records what a copy was built from; a copy whose
marker does not match is rebuilt at start-up. The copy is built in a temp folder and renamed into place.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.files import atomic_write_bytes, fsync_dir
from core.protocol.schemas import DeltaState, GalleryDelta
from device.config import GalleryConfig
from device.gallery import Gallery, GalleryError
from device.gallery.store import META_NAME, read_meta

logger = logging.getLogger(__name__)

MARKER = "built.json"
# Two templates closer than this (max abs difference after L2 normalisation) are the same template:
# a delta add that is already in the bundle's gallery is skipped instead of duplicated.
SAME_TEMPLATE_ATOL = 1e-5


@dataclass(frozen=True, slots=True)
class DeltaOutcome:
    """What applying a delta did."""

    state: DeltaState
    reason: str | None = None
    removed: int = 0
    added: int = 0


def apply_delta(gallery: Gallery, delta: GalleryDelta, embedder_sha256: str) -> DeltaOutcome:
    """Remove every tombstoned person, then add new templates when they come from our embedder."""
    removed = sum(1 for pid in delta.remove if gallery.remove_person(pid) > 0)
    if delta.add and delta.model_sha256 != embedder_sha256:
        reason = (f"adds were embedded with {delta.model_sha256[:12]}…, this device runs "
                  f"{embedder_sha256[:12]}…: gallery built for another model")
        return DeltaOutcome("removals_only", reason, removed, 0)
    added = 0
    if delta.add:
        tids, vectors = gallery.export_vectors()
        row_of = {tid: i for i, tid in enumerate(tids)}
        items = []
        for person in delta.add:
            new = np.asarray(person.vectors, np.float32)
            if new.shape[1] != gallery.dim:
                return DeltaOutcome("removals_only", f"adds have {new.shape[1]}-d vectors, the gallery "
                                    f"{gallery.dim}-d: gallery built for another model", removed, 0)
            new = new / np.maximum(np.linalg.norm(new, axis=1, keepdims=True), 1e-12)
            have = vectors[[row_of[t] for t in gallery.templates_of(person.person_id)]]
            if len(have):
                fresh = [v for v in new if not np.any(np.all(np.abs(have - v) <= SAME_TEMPLATE_ATOL, axis=1))]
            else:
                fresh = list(new)
            if fresh:
                items.append((person.person_id, person.name, np.asarray(fresh, np.float32)))
                added += len(fresh)
        if items:
            gallery.add_many(items)
    return DeltaOutcome("applied", None, removed, added)


class WorkingGallery:
    """Builds and finds ``<root>/<seq>`` working copies."""

    def __init__(self, root: Path, config: GalleryConfig) -> None:
        self.root = Path(root)
        self.config = config
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, sequence: int) -> Path:
        """Working gallery folder of bundle ``sequence``."""
        return self.root / str(sequence)

    @staticmethod
    def _marker(base_dir: Path, sequence: int, delta: GalleryDelta | None) -> dict[str, Any]:
        return {"bundle_sequence": sequence, "delta_seq": delta.seq if delta else 0,
                "base": read_meta(base_dir).content_sha256}

    def current_outcome(self, base_dir: Path, sequence: int,
                        delta: GalleryDelta | None) -> DeltaOutcome | None:
        """The recorded outcome when the working copy exists and was built from this bundle and delta."""
        folder = self.path(sequence)
        try:
            marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
            expected = self._marker(base_dir, sequence, delta)
            if any(marker.get(k) != v for k, v in expected.items()) or not (folder / META_NAME).is_file():
                return None
            return DeltaOutcome(marker.get("state", "applied"), marker.get("reason"))
        except (OSError, ValueError, AttributeError, TypeError):
            return None

    def ensure(self, base_dir: Path, sequence: int, embedder_sha256: str,
               delta: GalleryDelta | None) -> DeltaOutcome | None:
        """Rebuild the working copy unless it is already current; return the delta's outcome."""
        outcome = self.current_outcome(base_dir, sequence, delta)
        if outcome is not None:
            return outcome
        return self.rebuild(base_dir, sequence, embedder_sha256, delta)

    def rebuild(self, base_dir: Path, sequence: int, embedder_sha256: str,
                delta: GalleryDelta | None) -> DeltaOutcome | None:
        """Copy the bundle's gallery, apply ``delta``, and swap the result into place."""
        tag = uuid.uuid4().hex[:8]
        tmp = self.root / f".tmp-{sequence}-{tag}"
        shutil.copytree(base_dir, tmp)
        outcome = None
        try:
            if delta is not None:
                gallery = Gallery.open(tmp, embedder_sha256, self.config)
                try:
                    outcome = apply_delta(gallery, delta, embedder_sha256)
                    if outcome.added or outcome.removed:
                        gallery.save()
                finally:
                    gallery.close()
            marker = self._marker(base_dir, sequence, delta)
            if outcome is not None:
                marker.update(state=outcome.state, reason=outcome.reason)
            atomic_write_bytes(tmp / MARKER, json.dumps(marker).encode("utf-8"))
            fsync_dir(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        target = self.path(sequence)
        trash = self.root / f".old-{sequence}-{tag}"
        if target.exists():
            os.rename(target, trash)
        os.rename(tmp, target)
        fsync_dir(self.root)
        shutil.rmtree(trash, ignore_errors=True)
        logger.info("working gallery of bundle %d rebuilt (delta %s)", sequence,
                    delta.seq if delta else "none")
        return outcome

    def remove(self, sequence: int) -> None:
        """Delete one working copy."""
        shutil.rmtree(self.path(sequence), ignore_errors=True)

    def prune(self, keep: set[int]) -> None:
        """Delete working copies of bundles not in ``keep`` and leftover temp folders."""
        for entry in self.root.iterdir():
            stale = entry.name.isdigit() and int(entry.name) not in keep
            if stale or entry.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(entry, ignore_errors=True)


__all__ = ["DeltaOutcome", "GalleryError", "WorkingGallery", "apply_delta"]
