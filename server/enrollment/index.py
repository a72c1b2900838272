"""In-memory cosine search over the stored templates of one embedder, for verify, identify and duplicates.

A server gallery is small (tens of thousands of 128-d vectors: a few MB), so an exact matrix
product is both simpler and exact. The matrix is rebuilt lazily after any write in this process; the
templates are decrypted then (``server.enrollment.templates``) and live in memory only, never on disk.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.types import FloatArray
from server.crypto import ChipCipher
from server.db.models import Person, Template
from server.enrollment.templates import open_template


@dataclass(frozen=True, slots=True)
class IdentityScore:
    """Best template score of one person."""

    person_id: str
    name: str
    score: float


@dataclass(frozen=True, slots=True)
class _Snapshot:
    generation: int
    model_sha256: str
    person_ids: tuple[str, ...]
    names: dict[str, str]
    matrix: FloatArray  # (n, dim), rows L2-normalised


class EnrollmentIndex:
    """Cached (person, embedding) matrix for one model version; call :meth:`invalidate` after writes."""

    def __init__(self, cipher: ChipCipher) -> None:
        self.cipher = cipher
        self._generation = 0
        self._snapshot: _Snapshot | None = None
        self._lock = threading.Lock()

    def invalidate(self) -> None:
        """Mark the cache stale (templates were added or removed)."""
        with self._lock:
            self._generation += 1

    def _load(self, session: Session, model_sha256: str) -> _Snapshot:
        with self._lock:
            snap, generation = self._snapshot, self._generation
        if snap is not None and snap.generation == generation and snap.model_sha256 == model_sha256:
            return snap
        rows = session.execute(
            select(Template, Person.name)
            .join(Person, Person.id == Template.person_id)
            .where(Template.model_sha256 == model_sha256)
        ).all()
        person_ids = tuple(row[0].person_id for row in rows)
        names = {row[0].person_id: row[1] for row in rows}
        if rows:
            matrix = np.stack([open_template(self.cipher, row[0]) for row in rows]).astype(np.float32)
        else:
            matrix = np.zeros((0, 0), dtype=np.float32)
        snap = _Snapshot(generation, model_sha256, person_ids, names, matrix)
        with self._lock:
            if self._generation == generation:
                self._snapshot = snap
        return snap

    def search(self, session: Session, model_sha256: str, probe: FloatArray, k: int,
               exclude_person: str | None = None) -> list[IdentityScore]:
        """Top-``k`` persons by their best template's cosine to ``probe``, best first."""
        snap = self._load(session, model_sha256)
        if not snap.person_ids or snap.matrix.shape[1] != probe.shape[0]:
            return []
        scores = snap.matrix @ probe.astype(np.float32)
        best: dict[str, float] = {}
        for person_id, score in zip(snap.person_ids, scores.tolist(), strict=True):
            if person_id != exclude_person and score > best.get(person_id, -2.0):
                best[person_id] = score
        ranked = sorted(best.items(), key=lambda item: item[1], reverse=True)[:k]
        return [IdentityScore(pid, snap.names[pid], float(score)) for pid, score in ranked]

    def person_scores(self, session: Session, model_sha256: str, person_id: str,
                      probe: FloatArray) -> list[float]:
        """Cosine of ``probe`` to each template of one person."""
        snap = self._load(session, model_sha256)
        if not snap.person_ids or snap.matrix.shape[1] != probe.shape[0]:
            return []
        mask = np.array([pid == person_id for pid in snap.person_ids])
        if not mask.any():
            return []
        return [float(s) for s in (snap.matrix[mask] @ probe.astype(np.float32)).tolist()]
