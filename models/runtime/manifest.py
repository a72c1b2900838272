"""The model manifest: what ``facegate models build`` writes and every loader checks.

``manifest.json`` lists each model file with its sha256, shapes and quantization, so a
device can verify what it runs and a gallery can name the exact embedder it belongs to.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from core.files import atomic_write_bytes, sha256_file

MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA = 1

ModelRole = Literal["detector", "landmarks", "embedder", "liveness"]


class ManifestError(Exception):
    """The manifest is missing, unreadable, or does not match the files beside it."""


class QuantParams(BaseModel):
    """Affine quantization of one tensor: real = scale * (q - zero_point)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scale: float
    zero_point: int


class TensorSpec(BaseModel):
    """Name, shape, dtype and (when quantized) scale/zero point of a model input or output."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    shape: list[int]
    dtype: str
    quantization: QuantParams | None = None


class ModelEntry(BaseModel):
    """One model file in the manifest."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(..., description="Stable key, e.g. 'embedder-int8', 'blazeface-short'.")
    role: ModelRole
    version: str
    file: str = Field(..., description="File name relative to the manifest.")
    sha256: str
    size: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    source_package: str
    source_version: str
    license: str
    metrics: dict[str, float] = Field(default_factory=dict)
    extra: dict[str, str] = Field(default_factory=dict)


class Manifest(BaseModel):
    """All models of one build."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = MANIFEST_SCHEMA
    created: str
    models: list[ModelEntry]

    def get(self, name: str) -> ModelEntry:
        """Return the entry called ``name`` or raise ManifestError."""
        for entry in self.models:
            if entry.name == name:
                return entry
        raise ManifestError(f"model '{name}' is not in the manifest (has: {[m.name for m in self.models]})")

    def has(self, name: str) -> bool:
        """True when the manifest lists ``name``."""
        return any(entry.name == name for entry in self.models)


def load_manifest(directory: Path) -> Manifest:
    """Read ``directory/manifest.json``; raise ManifestError with a clear reason."""
    path = Path(directory) / MANIFEST_NAME
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ManifestError(f"no {MANIFEST_NAME} in {directory}: run `facegate models build`") from exc
    except (OSError, ValueError) as exc:
        raise ManifestError(f"cannot read {path}: {exc}") from exc
    try:
        return Manifest.model_validate(raw)
    except ValueError as exc:
        raise ManifestError(f"{path} is not a valid manifest: {exc}") from exc


def save_manifest(directory: Path, manifest: Manifest) -> Path:
    """Write the manifest atomically and return its path."""
    path = Path(directory) / MANIFEST_NAME
    atomic_write_bytes(path, manifest.model_dump_json(indent=2).encode("utf-8"))
    return path


def verify_entry(directory: Path, entry: ModelEntry) -> Path:
    """Check a model file's sha256 against the manifest; return its path or raise ManifestError."""
    path = Path(directory) / entry.file
    if not path.is_file():
        raise ManifestError(f"{entry.name}: file {path} is missing")
    actual = sha256_file(path)
    if actual != entry.sha256:
        raise ManifestError(f"{entry.name}: sha256 mismatch for {path} (manifest {entry.sha256[:12]}…, "
                            f"file {actual[:12]}…): the file was changed or corrupted; rebuild or reinstall")
    return path
