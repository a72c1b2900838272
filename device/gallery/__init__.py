"""FAISS gallery: persons with several templates, identity-level open-set search, atomic persistence."""

from device.gallery.gallery import NO_RUNNER_UP, Gallery, GalleryClosedError
from device.gallery.index import GalleryIndexError, IndexKind, IndexParams
from device.gallery.store import (
    GalleryCorruptError,
    GalleryError,
    GalleryModelMismatch,
    GalleryNotFoundError,
)

__all__ = [
    "NO_RUNNER_UP",
    "Gallery",
    "GalleryClosedError",
    "GalleryCorruptError",
    "GalleryError",
    "GalleryIndexError",
    "GalleryModelMismatch",
    "GalleryNotFoundError",
    "IndexKind",
    "IndexParams",
]
