"""The gallery: persons with several templates each, identity-level search, in-place deltas, files.

The index returns the ``top_k`` templates nearest the probe; their owners are the candidate
identities. A candidate's score is the cosine with the normalised mean of all its templates
(``identity_score = "mean"``, the default: several photos of a person average out each one's pose and
light) or with its best template (``"max"``); with one template both are that template's cosine.
``search`` returns the best identity and the runner-up identity's score as a ``Match``; with a single
enrolled person the runner-up is ``NO_RUNNER_UP`` (the cosine floor), so the margin never blocks a
lone enrollee.
Thread-safe: the frame loop searches while the MQTT thread applies add/remove deltas.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import numpy as np
import numpy.typing as npt

from core.files import atomic_write
from core.types import Match
from device.config import GalleryConfig
from device.gallery.index import GalleryIndex, IndexKind, IndexParams, Vectors, normalise
from device.gallery.store import (
    META_NAME,
    GalleryCorruptError,
    GalleryError,
    GalleryMeta,
    GalleryModelMismatch,
    IndexRecord,
    PersonRecord,
    format_version,
    read_meta,
    remove_stale,
    verified_file,
)

logger = logging.getLogger(__name__)

# Cosine floor: the runner-up score when no other identity exists, and the score of an empty gallery.
NO_RUNNER_UP = -1.0
# When the top-k templates all belong to one person, widen k by this factor to find a runner-up.
K_GROWTH = 4
# A person whose templates average to less than this norm (they point in opposite directions: a bad
# enrollment) is scored by their best template instead.
MIN_MEAN_NORM = 1e-3
_INITIAL_CAPACITY = 64


class GalleryClosedError(GalleryError):
    """The gallery was used after close()."""


class Gallery:
    """FAISS-backed gallery of persons and templates; a context manager, ``close()`` idempotent."""

    def __init__(self, directory: Path, dim: int, model_sha256: str, config: GalleryConfig,
                 model_version: str = "") -> None:
        self.directory = Path(directory)
        self.dim = dim
        self.model_sha256 = model_sha256
        self.model_version = model_version
        self.config = config
        self._lock = threading.RLock()
        self._uuid = uuid.uuid4().hex
        self._revision = 0
        self._next_id = 0
        self._persons: dict[str, PersonRecord] = {}
        self._owner: dict[int, str] = {}
        self._vectors: Vectors = np.zeros((_INITIAL_CAPACITY, dim), np.float32)
        self._row: dict[int, int] = {}
        self._free_rows: list[int] = []
        self._used_rows = 0
        self._index: GalleryIndex | None = GalleryIndex(dim, IndexParams.choose(0, config))
        self._content_hash: str | None = None
        self._means: dict[str, npt.NDArray[np.float32]] = {}  # person -> unit mean template (lazy)

    # ----------------------------------------------------------------- construction
    @classmethod
    def create(cls, directory: Path, dim: int, model_sha256: str, config: GalleryConfig,
               model_version: str = "") -> Gallery:
        """A new empty gallery for ``directory`` (nothing is written until ``save()``)."""
        return cls(directory, dim, model_sha256, config, model_version)

    @classmethod
    def open(cls, directory: Path, model_sha256: str, config: GalleryConfig) -> Gallery:
        """Load a saved gallery; raise ``GalleryModelMismatch`` if it belongs to another embedder."""
        directory = Path(directory)
        meta = read_meta(directory)
        if meta.model_sha256 != model_sha256:
            raise GalleryModelMismatch(directory, meta.model_sha256, model_sha256)
        gallery = cls(directory, meta.dim, meta.model_sha256, config, meta.model_version)
        gallery._restore(meta)
        logger.info("gallery %s loaded: %d persons, %d templates, %s index", gallery.version,
                    gallery.person_count, gallery.template_count, gallery.params.kind.value)
        return gallery

    @classmethod
    def open_or_create(cls, directory: Path, dim: int, model_sha256: str, config: GalleryConfig,
                       model_version: str = "") -> Gallery:
        """Load the gallery in ``directory`` or start an empty one there."""
        if (Path(directory) / META_NAME).is_file():
            return cls.open(directory, model_sha256, config)
        return cls.create(directory, dim, model_sha256, config, model_version)

    def _restore(self, meta: GalleryMeta) -> None:
        vectors_path = verified_file(self.directory, meta.vectors_file, meta.vectors_sha256)
        try:
            vectors = np.load(vectors_path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise GalleryCorruptError(f"cannot read {vectors_path}: {exc}") from exc
        if vectors.ndim != 2 or vectors.shape != (len(meta.template_ids), meta.dim) \
                or vectors.dtype != np.float32:
            raise GalleryCorruptError(f"{vectors_path} holds {vectors.dtype}{vectors.shape}, metadata "
                                      f"expects float32({len(meta.template_ids)}, {meta.dim})")
        self._uuid, self._revision, self._next_id = meta.gallery_uuid, meta.revision, meta.next_template_id
        self._persons = dict(meta.persons)
        self._means.clear()
        self._vectors = np.ascontiguousarray(vectors) if len(vectors) else self._vectors
        self._row = {tid: row for row, tid in enumerate(meta.template_ids)}
        self._used_rows = len(meta.template_ids)
        self._owner = {tid: pid for pid, rec in self._persons.items() for tid in rec.templates}
        if set(self._owner) != set(self._row):
            raise GalleryCorruptError(f"{self.directory / META_NAME}: person templates and vector rows "
                                      "differ")
        self._content_hash = meta.content_sha256
        wanted = IndexParams.choose(self.template_count, self.config)
        stored = _params_from_record(meta.index, self.config)
        if meta.index_file and meta.index_sha256 and stored.same_structure(wanted):
            path = verified_file(self.directory, meta.index_file, meta.index_sha256)
            blob = np.fromfile(path, dtype=np.uint8)
            index = GalleryIndex.from_bytes(self.dim, stored, blob, set(meta.tombstones))
            if index.live != self.template_count:
                raise GalleryCorruptError(f"{path} holds {index.live} live vectors, metadata has "
                                          f"{self.template_count}")
            self._index = index
        else:
            self._rebuild(wanted)

    # ----------------------------------------------------------------- properties
    def _live_index(self) -> GalleryIndex:
        if self._index is None:
            raise GalleryClosedError(f"gallery {self.directory} is closed")
        return self._index

    @property
    def revision(self) -> int:
        """Monotonic revision: +1 for every add or remove."""
        return self._revision

    @property
    def version(self) -> str:
        """``<revision>-<content hash prefix>``, reported with every decision."""
        with self._lock:
            return format_version(self._revision, self.content_sha256())

    @property
    def params(self) -> IndexParams:
        """Kind and parameters of the index in use."""
        return self._live_index().params

    @property
    def person_count(self) -> int:
        """Enrolled persons."""
        return len(self._persons)

    @property
    def template_count(self) -> int:
        """Templates over all persons."""
        return len(self._row)

    def persons(self) -> dict[str, str]:
        """A copy of person id -> name."""
        with self._lock:
            return {pid: rec.name for pid, rec in self._persons.items()}

    def templates_of(self, person_id: str) -> list[int]:
        """Template ids of one person (empty if unknown)."""
        rec = self._persons.get(person_id)
        return list(rec.templates) if rec else []

    def __contains__(self, person_id: object) -> bool:
        return person_id in self._persons

    def __len__(self) -> int:
        return len(self._persons)

    # ----------------------------------------------------------------- deltas
    def _store_rows(self, vectors: Vectors) -> list[int]:
        rows: list[int] = []
        while self._free_rows and len(rows) < len(vectors):
            rows.append(self._free_rows.pop())
        extra = len(vectors) - len(rows)
        if self._used_rows + extra > len(self._vectors):
            capacity = max(len(self._vectors) * 2, self._used_rows + extra)
            grown = np.zeros((capacity, self.dim), np.float32)
            grown[: self._used_rows] = self._vectors[: self._used_rows]
            self._vectors = grown
        rows.extend(range(self._used_rows, self._used_rows + extra))
        self._used_rows += extra
        self._vectors[rows] = vectors
        return rows

    def add_person(self, person_id: str, name: str, vectors: npt.ArrayLike) -> list[int]:
        """Add templates for a person (new or existing; the name is updated); return the template ids."""
        return self.add_many([(person_id, name, vectors)])[person_id]

    def add_many(self, items: Iterable[tuple[str, str, npt.ArrayLike]]) -> dict[str, list[int]]:
        """Add several persons' templates in one index operation; return person id -> new template ids."""
        prepared = [(pid, name, normalise(vecs, self.dim)) for pid, name, vecs in items]
        for pid, name, _ in prepared:
            if not pid or not isinstance(pid, str):
                raise GalleryError(f"person id must be a non-empty string, got {pid!r}")
            if not isinstance(name, str):
                raise GalleryError(f"name of {pid!r} must be a string")
        with self._lock:
            index = self._live_index()
            added: dict[str, list[int]] = {}
            all_ids: list[int] = []
            all_vecs: list[Vectors] = []
            for pid, name, vecs in prepared:
                ids = list(range(self._next_id, self._next_id + len(vecs)))
                self._next_id += len(vecs)
                old = self._persons.get(pid)
                kept = old.templates if old else []
                self._persons[pid] = PersonRecord(name=name, templates=[*kept, *ids])
                self._means.pop(pid, None)
                self._owner.update((tid, pid) for tid in ids)
                self._row.update(zip(ids, self._store_rows(vecs), strict=True))
                added.setdefault(pid, []).extend(ids)
                all_ids.extend(ids)
                all_vecs.append(vecs)
            self._revision += 1
            self._content_hash = None
            wanted = IndexParams.choose(self.template_count, self.config)
            if not index.params.same_structure(wanted):
                self._rebuild(wanted)
            elif all_ids:
                index.add(np.asarray(all_ids, np.int64), np.concatenate(all_vecs))
        return added

    def remove_person(self, person_id: str) -> int:
        """Remove a person and all their templates in place; return how many templates went."""
        with self._lock:
            index = self._live_index()
            rec = self._persons.pop(person_id, None)
            if rec is None:
                return 0
            self._means.pop(person_id, None)
            for tid in rec.templates:
                self._owner.pop(tid, None)
                self._free_rows.append(self._row.pop(tid))
            index.remove(np.asarray(rec.templates, np.int64))
            self._revision += 1
            self._content_hash = None
            wanted = IndexParams.choose(self.template_count, self.config)
            # Back to exact below half the threshold (hysteresis), or compact a graph full of tombstones.
            if index.needs_compaction() or (wanted.kind is IndexKind.FLAT
                                            and self.template_count <= self.config.exact_max // 2
                                            and index.params.kind is not IndexKind.FLAT):
                self._rebuild(wanted)
            return len(rec.templates)

    def compact(self) -> None:
        """Rebuild the index from the live vectors (drops HNSW tombstones)."""
        with self._lock:
            self._rebuild(IndexParams.choose(self.template_count, self.config))

    def _ordered(self) -> tuple[list[int], Vectors]:
        """Template ids and vectors in person order (the order files and hashes use)."""
        tids = [tid for pid in sorted(self._persons) for tid in self._persons[pid].templates]
        rows = np.fromiter((self._row[t] for t in tids), dtype=np.int64, count=len(tids))
        return tids, self._vectors[rows] if len(rows) else np.zeros((0, self.dim), np.float32)

    def _rebuild(self, params: IndexParams) -> None:
        started = time.monotonic()
        tids, vectors = self._ordered()
        self._index = GalleryIndex.build(self.dim, params, np.asarray(tids, np.int64), vectors)
        logger.info("gallery index rebuilt as %s over %d templates in %.1f s", params.kind.value,
                    len(tids), time.monotonic() - started)

    # ----------------------------------------------------------------- search
    def search(self, vector: npt.ArrayLike) -> Match:
        """Best identity and runner-up identity for one probe embedding."""
        return self.search_many(vector)[0]

    def search_many(self, vectors: npt.ArrayLike) -> list[Match]:
        """``search`` for a batch of probes (N, dim)."""
        queries = normalise(vectors, self.dim)
        with self._lock:
            index = self._live_index()
            if not self._persons:
                return [Match(None, None, NO_RUNNER_UP, NO_RUNNER_UP) for _ in range(len(queries))]
            k = min(self.config.top_k, index.live)
            scores, ids = index.search(queries, k)
            matches = [self._identity(queries[i], scores[i], ids[i]) for i in range(len(queries))]
            # Widen k for probes whose top-k held a single identity while others exist.
            while len(self._persons) > 1 and k < index.live:
                todo = [i for i, m in enumerate(matches) if m.runner_up_score == NO_RUNNER_UP]
                if not todo:
                    break
                k = min(k * K_GROWTH, index.live)
                scores, ids = index.search(queries[todo], k)
                for j, i in enumerate(todo):
                    matches[i] = self._identity(queries[i], scores[j], ids[j])
            return matches

    def search_templates(self, vectors: npt.ArrayLike, k: int = 1) -> tuple[npt.NDArray[np.float32],
                                                                            npt.NDArray[np.int64]]:
        """Raw top-``k`` (cosines, template ids) per probe from the index (benchmarks, diagnostics)."""
        queries = normalise(vectors, self.dim)
        with self._lock:
            return self._live_index().search(queries, k)

    def owner_of(self, template_id: int) -> str | None:
        """Person id owning a template id, or None."""
        return self._owner.get(template_id)

    def _mean_of(self, person_id: str) -> npt.NDArray[np.float32] | None:
        """Unit mean of a person's templates (cached until the person changes); None if they cancel out."""
        mean = self._means.get(person_id)
        if mean is None:
            rows = [self._row[t] for t in self._persons[person_id].templates]
            total = self._vectors[rows].mean(axis=0)
            norm = float(np.linalg.norm(total))
            if norm < MIN_MEAN_NORM:
                return None
            mean = (total / norm).astype(np.float32)
            self._means[person_id] = mean
        return mean

    def _person_score(self, person_id: str, best: float, query: npt.NDArray[np.float32]) -> float:
        """The identity score of a candidate whose best template scored ``best``."""
        if self.config.identity_score == "max" or len(self._persons[person_id].templates) == 1:
            return best
        mean = self._mean_of(person_id)
        return best if mean is None else float(mean @ query)

    def _identity(self, query: npt.NDArray[np.float32], scores: npt.NDArray[np.float32],
                  ids: npt.NDArray[np.int64]) -> Match:
        best: dict[str, float] = {}
        for score, tid in zip(scores.tolist(), ids.tolist(), strict=True):
            pid = self._owner.get(tid) if tid >= 0 else None
            if pid is not None and score > best.get(pid, -np.inf):
                best[pid] = score
        best = {pid: self._person_score(pid, score, query) for pid, score in best.items()}
        if not best:
            return Match(None, None, NO_RUNNER_UP, NO_RUNNER_UP)
        ranked = sorted(best.items(), key=lambda kv: kv[1], reverse=True)
        pid, score = ranked[0]
        runner = ranked[1][1] if len(ranked) > 1 else NO_RUNNER_UP
        return Match(pid, self._persons[pid].name, float(score), float(runner))

    # ----------------------------------------------------------------- persistence
    def content_sha256(self) -> str:
        """Hash over sorted person ids, names and template vectors (independent of local template ids)."""
        with self._lock:
            if self._content_hash is None:
                digest = hashlib.sha256(f"dim={self.dim};model={self.model_sha256}\n".encode())
                for pid in sorted(self._persons):
                    rec = self._persons[pid]
                    digest.update(f"{pid}\x00{rec.name}\x00{len(rec.templates)}\n".encode())
                    rows = [self._row[t] for t in rec.templates]
                    digest.update(np.ascontiguousarray(self._vectors[rows]).tobytes())
                self._content_hash = digest.hexdigest()
            return self._content_hash

    def save(self) -> str:
        """Write vectors, index (HNSW) and metadata atomically; return the saved version."""
        with self._lock:
            index = self._live_index()
            tids, vectors = self._ordered()
            rev = self._revision
            vectors_file = f"vectors-{rev}.npy"

            def write_vectors(handle: BinaryIO) -> None:
                np.save(handle, vectors, allow_pickle=False)

            vectors_sha = atomic_write(self.directory / vectors_file, write_vectors)
            index_file = index_sha = None
            if index.params.kind is not IndexKind.FLAT:  # approximate indexes are slow to rebuild: keep them
                index_file = f"index-{rev}.faiss"
                blob = index.to_bytes()
                index_sha = atomic_write(self.directory / index_file, lambda h: h.write(blob.tobytes()))
            p = index.params
            meta = GalleryMeta(
                gallery_uuid=self._uuid, revision=rev, content_sha256=self.content_sha256(),
                model_sha256=self.model_sha256, model_version=self.model_version, dim=self.dim,
                index=IndexRecord(**p.as_dict()),
                vectors_file=vectors_file, vectors_sha256=vectors_sha, index_file=index_file,
                index_sha256=index_sha, tombstones=sorted(index.tombstones), next_template_id=self._next_id,
                template_ids=tids, persons=dict(sorted(self._persons.items())),
                updated=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            )
            payload = meta.model_dump_json(indent=1).encode("utf-8")
            atomic_write(self.directory / META_NAME, lambda h: h.write(payload))
            remove_stale(self.directory, {vectors_file, *([index_file] if index_file else [])})
            logger.info("gallery %s saved to %s (%d persons, %d templates)", meta.version, self.directory,
                        self.person_count, self.template_count)
            return meta.version

    def export_vectors(self) -> tuple[list[int], Vectors]:
        """Template ids and vectors in file order (for bundle builders and tests)."""
        with self._lock:
            return self._ordered()

    def close(self) -> None:
        """Release the index (safe to call twice); unsaved deltas are dropped."""
        with self._lock:
            self._index = None

    def __enter__(self) -> Gallery:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _params_from_record(record: IndexRecord, config: GalleryConfig) -> IndexParams:
    """Stored index structure with the config's current search breadth (efSearch / nprobe)."""
    kind = IndexKind(record.kind)
    return IndexParams(
        kind, record.hnsw_m, config.hnsw_ef_search if kind is IndexKind.HNSW else record.ef_search,
        record.ef_construction, record.nlist,
        min(config.ivf_nprobe, record.nlist) if kind is IndexKind.IVF else record.nprobe, record.trained_on,
    )
