"""Gallery persistence: metadata JSON as the commit point, vectors (``.npy``) and HNSW index beside it.

Every file is written atomically (temp file in the same folder, fsync, rename, fsync the folder).
Data files carry the revision in their name and the metadata names them with their sha256, so the
rename of ``gallery.json`` commits a whole new gallery at once: a power cut leaves the old gallery
or the new one, never a mix. Stale data files are deleted after the commit.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from core.bundle_layout import META_NAME as META_NAME
from core.files import sha256_file

logger = logging.getLogger(__name__)

META_SCHEMA = 1


class GalleryError(Exception):
    """Base class of gallery errors."""


class GalleryNotFoundError(GalleryError):
    """No gallery has been saved in the folder yet."""


class GalleryCorruptError(GalleryError):
    """The gallery files are unreadable or do not match their metadata."""


class GalleryModelMismatch(GalleryError):
    """The gallery was embedded with a different model than the one running."""

    def __init__(self, directory: Path, gallery_sha256: str, model_sha256: str) -> None:
        super().__init__(
            f"gallery in {directory} was built for embedder sha256 {gallery_sha256[:12]}… but the active "
            f"embedder is {model_sha256[:12]}…; re-embed the gallery with this model (server bundle) or "
            f"re-enroll locally with `facegate device enroll`"
        )
        self.directory = directory
        self.gallery_sha256 = gallery_sha256
        self.model_sha256 = model_sha256


class PersonRecord(BaseModel):
    """One enrolled person: display name and template ids (row order in the vectors file)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    templates: list[int]


class IndexRecord(BaseModel):
    """Index kind and parameters in use when the gallery was saved."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str
    hnsw_m: int = 0
    ef_search: int = 0
    ef_construction: int = 0
    nlist: int = 0
    nprobe: int = 0
    trained_on: int = 0


class GalleryMeta(BaseModel):
    """``gallery.json``: everything needed to reload and to verify the gallery."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = META_SCHEMA
    gallery_uuid: str = Field(..., description="Lineage id, fixed when the gallery is created.")
    revision: int = Field(..., ge=0, description="Monotonic: +1 per add/remove.")
    content_sha256: str = Field(..., description="Hash of persons, names and vectors.")
    model_sha256: str
    model_version: str = ""
    dim: int = Field(..., ge=1)
    index: IndexRecord
    vectors_file: str
    vectors_sha256: str
    index_file: str | None = None
    index_sha256: str | None = None
    tombstones: list[int] = Field(default_factory=list)
    next_template_id: int = Field(..., ge=0)
    template_ids: list[int] = Field(..., description="Template id of each row of the vectors file.")
    persons: dict[str, PersonRecord]
    updated: str

    @property
    def version(self) -> str:
        """``<revision>-<content hash prefix>``."""
        return format_version(self.revision, self.content_sha256)


def format_version(revision: int, content_sha256: str) -> str:
    """The gallery version string reported in decisions and status."""
    return f"{revision}-{content_sha256[:12]}"


def read_meta(directory: Path) -> GalleryMeta:
    """Read and validate ``gallery.json``."""
    path = directory / META_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise GalleryNotFoundError(f"no gallery in {directory} (missing {META_NAME})") from exc
    except OSError as exc:
        raise GalleryCorruptError(f"cannot read {path}: {exc}") from exc
    try:
        meta = GalleryMeta.model_validate_json(raw)
    except ValueError as exc:
        raise GalleryCorruptError(f"{path} is not valid gallery metadata: {exc}") from exc
    if meta.schema_version != META_SCHEMA:
        raise GalleryCorruptError(f"{path} has schema {meta.schema_version}, this device reads {META_SCHEMA}")
    return meta


def verified_file(directory: Path, name: str, sha256: str) -> Path:
    """Path of a data file after checking its sha256 against the metadata."""
    path = directory / name
    if not path.is_file():
        raise GalleryCorruptError(f"gallery file {path} is missing")
    actual = sha256_file(path)
    if actual != sha256:
        raise GalleryCorruptError(f"gallery file {path} has sha256 {actual[:12]}…, metadata says "
                                  f"{sha256[:12]}…: the gallery is corrupt; reinstall the bundle")
    return path


def remove_stale(directory: Path, keep: set[str]) -> None:
    """Delete data files and leftover temp files that the committed metadata no longer names."""
    for path in directory.iterdir():
        stale_data = path.name.startswith(("vectors-", "index-")) and path.name not in keep
        leftover_tmp = path.name.startswith(".") and path.name.endswith(".tmp")
        if (stale_data or leftover_tmp) and path.is_file():
            try:
                path.unlink()
            except OSError as exc:
                logger.warning("cannot delete stale gallery file %s: %s", path, exc)
