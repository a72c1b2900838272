"""A complete models folder for one registry version: the built detector, mesh and liveness plus its embedder.

The doors and the enrollment station load a models folder (``manifest.json`` and the files it lists), and
a bundle ships one. A registry version records only its embedder files (``artifacts``: ``int8`` and
``float32`` paths, with their sha256 when the exporter wrote them). :func:`models_folder_for` composes
``<data_dir>/models/<version>/`` from the base folder (``[models] dir``, default the built models) with
every embedder entry replaced by the version's files, so the manifest names the exact embedder (sha256)
that the re-embedded gallery belongs to. The folder is built in a temp folder and renamed, and reused
(after a sha256 check) on the next promotion or rollback to that version.

Light on purpose (LiteRT, no TensorFlow): the server imports it at startup (:func:`active_models_dir`).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import uuid
from pathlib import Path

from core.files import sha256_file
from device.vision.embedder import EMBEDDER_ENTRIES, Embedder, EmbedderError
from models.runtime.assets import default_models_dir
from models.runtime.manifest import (
    MANIFEST_NAME,
    Manifest,
    ManifestError,
    ModelEntry,
    load_manifest,
    save_manifest,
    verify_entry,
)
from server.config import ServerConfig
from server.db.session import Database
from server.registry.registry import ModelRegistry, ModelVersion

logger = logging.getLogger(__name__)

MODELS_SUBDIR = "models"
SOURCE_PACKAGE = "facegate-registry"
UNKNOWN_LICENSE = "unspecified: trained by facegate (see the registry entry and its data)"


class ModelFolderError(Exception):
    """A registry version cannot make a models folder (missing or changed artifact, no base models)."""


def version_models_dir(config: ServerConfig, version: str) -> Path:
    """Where the models folder of registry ``version`` lives."""
    return config.data_dir / MODELS_SUBDIR / version


def embedder_entry_name(config: ServerConfig) -> str:
    """The manifest entry the server and the doors run (``[models] embedder``: int8 by default)."""
    return EMBEDDER_ENTRIES[config.models.embedder]


def _verified(folder: Path) -> Manifest:
    manifest = load_manifest(folder)
    for entry in manifest.models:
        verify_entry(folder, entry)
    return manifest


def _artifact(version: ModelVersion, variant: str) -> Path | None:
    """The version's ``variant`` file, checked against the sha256 recorded at registration."""
    recorded = version.artifacts.get(variant)
    if not recorded:
        return None
    path = Path(str(recorded))
    if not path.is_file():
        raise ModelFolderError(f"{version.version}: its {variant} embedder {path} is missing")
    expected = version.artifacts.get(f"{variant}_sha256")
    if expected and sha256_file(path) != expected:
        raise ModelFolderError(f"{version.version}: {path} changed since registration (sha256 "
                               f"{str(expected)[:12]}… recorded); re-export and register it again")
    return path


def _embedder_entry(tmp: Path, name: str, src: Path, version: ModelVersion,
                    base: ModelEntry | None) -> ModelEntry:
    """Copy ``src`` into ``tmp`` and describe it; the base entry's card is kept when the file is the same."""
    file = f"{name}.tflite"
    shutil.copy2(src, tmp / file)
    sha = sha256_file(tmp / file)
    try:
        Embedder.from_file(tmp / file).close()  # refuses a file that is not a 150x150 chip embedder
    except (EmbedderError, ValueError, RuntimeError) as exc:
        raise ModelFolderError(f"{version.version}: {src} is not a usable embedder: {exc}") from exc
    if base is not None and base.sha256 == sha:
        return base.model_copy(update={"version": version.version, "file": file})
    from models.convert.export import tensor_specs  # LiteRT only; TensorFlow stays unimported

    inputs, outputs = tensor_specs(tmp / file)
    return ModelEntry(name=name, role="embedder", version=version.version, file=file, sha256=sha,
                      size=(tmp / file).stat().st_size, inputs=inputs, outputs=outputs,
                      source_package=SOURCE_PACKAGE, source_version=version.version,
                      license=str(version.artifacts.get("license") or UNKNOWN_LICENSE),
                      extra={"registry_version": version.version, "parent": version.parent_version or ""})


def models_folder_for(config: ServerConfig, version: ModelVersion) -> Path:
    """The models folder of an embedder ``version`` (composed on first use); else ModelFolderError."""
    if version.kind != "embedder":
        raise ModelFolderError(f"{version.version} is a {version.kind}, not an embedder")
    dest = version_models_dir(config, version.version)
    if (dest / MANIFEST_NAME).is_file():
        try:
            _verified(dest)
        except ManifestError as exc:
            raise ModelFolderError(f"models folder {dest} of {version.version} is damaged: {exc}; "
                                   "delete it to compose it again") from exc
        return dest
    base_dir = config.models.dir or default_models_dir()
    try:
        base = _verified(base_dir)
    except ManifestError as exc:
        raise ModelFolderError(f"base models folder {base_dir}: {exc}") from exc
    sources = {name: src for variant, name in EMBEDDER_ENTRIES.items()
               if (src := _artifact(version, variant)) is not None}
    wanted = embedder_entry_name(config)
    if wanted not in sources:
        raise ModelFolderError(f"{version.version} has no {config.models.embedder} embedder artifact "
                               f"(artifacts: {sorted(version.artifacts)}); the doors run {wanted}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{version.version}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        entries = []
        for entry in base.models:
            if entry.role != "embedder":
                target = tmp / entry.file
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(base_dir / entry.file, target)
                entries.append(entry)
        for name, src in sources.items():
            old = base.get(name) if base.has(name) else None
            entries.append(_embedder_entry(tmp, name, src, version, old))
        save_manifest(tmp, Manifest(created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                                    models=entries))
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("models folder for %s composed in %s", version.version, dest)
    return dest


def active_models_dir(config: ServerConfig, database: Database) -> Path | None:
    """The promoted embedder's models folder, or None before the first promotion (use ``[models] dir``)."""
    current = ModelRegistry(database).current("embedder")
    if current is None:
        return None
    folder = version_models_dir(config, current.version)
    if not (folder / MANIFEST_NAME).is_file():
        logger.warning("promoted embedder %s has no models folder at %s; running [models] dir instead "
                       "(promote or roll back again to compose it)", current.version, folder)
        return None
    return folder
