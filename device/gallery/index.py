"""The FAISS layer of the gallery: an exact, IVF or HNSW inner-product index keyed by template id.

Vectors are L2-normalised, so inner product is cosine similarity. Small galleries use
``IndexIDMap2(IndexFlatIP)``: exact, and ``remove_ids`` works. Above ``exact_max`` templates the
gallery switches to the configured approximate index:

- ``ivf`` (default): ``IndexIDMap2(IndexIVFFlat)`` with ``METRIC_INNER_PRODUCT``, trained by k-means on
  the gallery itself. It builds in seconds to minutes where HNSW takes tens of minutes at 1M on one core
  (``facegate bench gallery`` measures both), and ``remove_ids`` works in place.
- ``hnsw``: ``IndexIDMap2(IndexHNSWFlat)``. HNSW cannot remove vectors, so a removed template becomes a
  tombstone that FAISS filters at search time through an ``IDSelectorNot``; once tombstones exceed
  ``TOMBSTONE_COMPACT_FRACTION`` of the graph the index is rebuilt from the live vectors.
"""

from __future__ import annotations

import enum
import logging
import math
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

from device.config import GalleryConfig
from device.gallery.store import GalleryError

logger = logging.getLogger(__name__)

IdArray = npt.NDArray[np.int64]
Vectors = npt.NDArray[np.float32]

# Filtering tombstones costs HNSW a little recall and time per search; rebuilding a large graph costs
# minutes. Compact once a fifth of the graph is dead: search stays within a few % of a clean graph.
TOMBSTONE_COMPACT_FRACTION = 0.2
# IVF: about 4 sqrt(N) cells (rounded to a power of two) balances the coarse scan against the list scan;
# k-means wants at least ~39 points per cell, and gains little beyond 64 per cell for the training set.
IVF_CELLS_PER_SQRT_N = 4
IVF_MIN_POINTS_PER_CELL = 39
IVF_TRAIN_POINTS_PER_CELL = 64
IVF_MIN_NLIST, IVF_MAX_NLIST = 1, 1 << 16
# A gallery that grew this many times past the size its IVF cells were trained on is retrained: the
# lists get long and the cells no longer follow the data.
IVF_RETRAIN_GROWTH = 4
# Seed of the k-means initialisation, so a rebuild of the same gallery gives the same index.
IVF_SEED = 1234
# Vectors whose norm is this far from 1 are renormalised rather than trusted.
NORM_TOLERANCE = 1e-3


# faiss's partial stubs miss some SWIG classes (SearchParametersHNSW); reach those through Any.
_FAISS: Any = faiss


class IndexKind(enum.StrEnum):
    """Which FAISS index backs the gallery."""

    FLAT = "flat"
    IVF = "ivf"
    HNSW = "hnsw"


@dataclass(frozen=True, slots=True)
class IndexParams:
    """Index kind and its parameters, recorded in the gallery metadata."""

    kind: IndexKind
    hnsw_m: int = 0
    ef_search: int = 0
    ef_construction: int = 0
    nlist: int = 0
    nprobe: int = 0
    trained_on: int = 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {"kind": self.kind.value, "hnsw_m": self.hnsw_m, "ef_search": self.ef_search,
                "ef_construction": self.ef_construction, "nlist": self.nlist, "nprobe": self.nprobe,
                "trained_on": self.trained_on}

    @classmethod
    def choose(cls, count: int, config: GalleryConfig) -> IndexParams:
        """The index the config picks for ``count`` templates."""
        if count <= config.exact_max:
            return cls(IndexKind.FLAT)
        if config.approximate == "hnsw":
            return cls(IndexKind.HNSW, config.hnsw_m, config.hnsw_ef_search, config.hnsw_ef_construction)
        nlist = config.ivf_nlist or auto_nlist(count)
        return cls(IndexKind.IVF, nlist=nlist, nprobe=min(config.ivf_nprobe, nlist), trained_on=count)

    def same_structure(self, other: IndexParams) -> bool:
        """True when ``other`` needs no rebuild of this index (search breadth may differ)."""
        if self.kind is not other.kind:
            return False
        if self.kind is IndexKind.IVF:
            return other.trained_on <= IVF_RETRAIN_GROWTH * self.trained_on
        return True


def auto_nlist(count: int) -> int:
    """IVF cell count for ``count`` vectors: ~4 sqrt(N) as a power of two, with enough points per cell."""
    target = IVF_CELLS_PER_SQRT_N * math.sqrt(max(count, 1))
    nlist = 1 << max(0, round(math.log2(target)))
    nlist = min(nlist, max(1, count // IVF_MIN_POINTS_PER_CELL))
    return int(min(max(nlist, IVF_MIN_NLIST), IVF_MAX_NLIST))


class GalleryIndexError(GalleryError):
    """Vectors or ids handed to the index are unusable."""


def normalise(vectors: npt.ArrayLike, dim: int) -> Vectors:
    """Return a C-contiguous float32 (N, dim) copy with unit rows; reject NaN, inf and zero rows."""
    arr = np.asarray(vectors, dtype=np.float32)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise GalleryIndexError(f"expected vectors of dimension {dim}, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise GalleryIndexError("vectors contain NaN or inf")
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    if np.any(norms < 1e-12):
        raise GalleryIndexError("a vector has zero norm")
    out = np.ascontiguousarray(arr / norms if np.any(np.abs(norms - 1) > NORM_TOLERANCE) else arr.copy())
    return out


class GalleryIndex:
    """A FAISS inner-product index over template ids with tombstone-based removal for HNSW."""

    def __init__(self, dim: int, params: IndexParams) -> None:
        self.dim = dim
        self.params = params
        self._index = self._empty(dim, params)
        self._tombstones: set[int] = set()
        self._keepalive: tuple[Any, ...] = ()
        self._search_params: Any = self._make_search_params()
        self._params_stale = False

    @staticmethod
    def _empty(dim: int, params: IndexParams) -> Any:
        if params.kind is IndexKind.FLAT:
            inner: Any = faiss.IndexFlatIP(dim)
        elif params.kind is IndexKind.IVF:
            quantizer = faiss.IndexFlatIP(dim)
            ivf = faiss.IndexIVFFlat(quantizer, dim, params.nlist, faiss.METRIC_INNER_PRODUCT)
            ivf.nprobe = params.nprobe
            # id -> list position table: remove_ids touches one list instead of scanning all of them
            ivf.set_direct_map_type(_FAISS.DirectMap.Hashtable)
            # IVF stores our ids itself. Not under IndexIDMap2: IVF's remove_ids does not renumber the
            # remaining vectors, while IDMap2 compacts its id table as if it did, scrambling the ids.
            return ivf
        else:
            inner = faiss.IndexHNSWFlat(dim, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = params.ef_construction
            inner.hnsw.efSearch = params.ef_search
        return faiss.IndexIDMap2(inner)

    @classmethod
    def build(cls, dim: int, params: IndexParams, ids: IdArray, vectors: Vectors) -> GalleryIndex:
        """A fresh index holding ``vectors`` under ``ids`` (vectors already normalised)."""
        index = cls(dim, params)
        if params.kind is IndexKind.IVF:
            index._train(vectors)
        if len(ids):
            index.add(ids, vectors)
        return index

    def _train(self, vectors: Vectors) -> None:
        """k-means the IVF cells on (a sample of) the gallery's own vectors."""
        if len(vectors) < self.params.nlist:
            raise GalleryIndexError(f"IVF with {self.params.nlist} cells needs at least that many vectors, "
                                    f"got {len(vectors)}; lower gallery.ivf_nlist or raise exact_max")
        sample = vectors
        limit = IVF_TRAIN_POINTS_PER_CELL * self.params.nlist
        if len(vectors) > limit:
            rows = np.random.default_rng(IVF_SEED).choice(len(vectors), limit, replace=False)
            sample = vectors[np.sort(rows)]
        ivf = faiss.extract_index_ivf(self._index)
        ivf.cp.seed = IVF_SEED
        ivf.train(np.ascontiguousarray(sample, dtype=np.float32))

    @classmethod
    def from_bytes(cls, dim: int, params: IndexParams, blob: npt.NDArray[np.uint8],
                   tombstones: set[int]) -> GalleryIndex:
        """Restore a serialised index (``faiss.serialize_index``) and its tombstones."""
        index = cls(dim, params)
        try:
            loaded = faiss.deserialize_index(blob)
        except RuntimeError as exc:
            raise GalleryIndexError(f"cannot read the stored FAISS index: {exc}") from exc
        if loaded.d != dim:
            raise GalleryIndexError(f"stored index has dimension {loaded.d}, expected {dim}")
        index._index = loaded
        index._tombstones = set(tombstones)
        index._search_params = index._make_search_params()
        return index

    def to_bytes(self) -> npt.NDArray[np.uint8]:
        """Serialise the FAISS index (tombstones are stored separately by the caller)."""
        blob: npt.NDArray[np.uint8] = faiss.serialize_index(self._index)
        return blob

    @property
    def ntotal(self) -> int:
        """Vectors in the FAISS index, tombstones included."""
        return int(self._index.ntotal)

    @property
    def live(self) -> int:
        """Vectors that searches can return."""
        return self.ntotal - len(self._tombstones)

    @property
    def tombstones(self) -> frozenset[int]:
        """Template ids removed from an HNSW graph but still inside it."""
        return frozenset(self._tombstones)

    def needs_compaction(self) -> bool:
        """True when dead vectors exceed the compaction fraction."""
        return bool(self._tombstones) and len(self._tombstones) > TOMBSTONE_COMPACT_FRACTION * self.ntotal

    def _make_search_params(self) -> Any:
        if self.params.kind is IndexKind.FLAT:
            return None
        if self.params.kind is IndexKind.IVF:
            return _FAISS.SearchParametersIVF(nprobe=self.params.nprobe)
        selector: Any = None
        if self._tombstones:
            batch = faiss.IDSelectorBatch(np.fromiter(self._tombstones, dtype=np.int64))
            selector = faiss.IDSelectorNot(batch)
            # SWIG holds raw pointers: keep both selectors alive as long as the search parameters
            self._keepalive = (batch, selector)
        params: Any = _FAISS.SearchParametersHNSW(efSearch=self.params.ef_search)
        if selector is not None:
            params.sel = selector
        return params

    def add(self, ids: IdArray, vectors: Vectors) -> None:
        """Add normalised vectors under new template ids."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(ids) != len(vectors):
            raise GalleryIndexError(f"{len(ids)} ids for {len(vectors)} vectors")
        self._index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids)

    def remove(self, ids: IdArray) -> None:
        """Remove template ids: in place for flat and IVF, as tombstones for HNSW."""
        if not len(ids):
            return
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if self.params.kind is IndexKind.IVF:  # the hashtable direct map takes only an id array
            self._index.remove_ids(_FAISS.IDSelectorArray(len(ids), faiss.swig_ptr(ids)))
            return
        if self.params.kind is IndexKind.FLAT:
            self._index.remove_ids(faiss.IDSelectorBatch(ids))
            return
        self._tombstones.update(int(i) for i in ids)
        self._params_stale = True  # rebuilt at the next search: bulk removals stay O(1) each

    def search(self, queries: Vectors, k: int) -> tuple[npt.NDArray[np.float32], IdArray]:
        """Top-``k`` (scores, template ids) per query; missing slots have id -1."""
        k = max(1, min(k, self.live)) if self.live else 1
        if self._params_stale:
            self._search_params, self._params_stale = self._make_search_params(), False
        if self._search_params is None:
            scores, ids = self._index.search(queries, k)
        else:
            scores, ids = self._index.search(queries, k, params=self._search_params)
        return scores.astype(np.float32, copy=False), ids.astype(np.int64, copy=False)
