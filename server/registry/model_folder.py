"""A complete models folder for one registry version: the built detector, mesh and liveness plus its embedder.

The doors and the enrollment station load a models folder (``manifest.json`` and the files it lists), and
a bundle ships one. A registry version records only its embedder files (``artifacts``: ``int8`` and
``float32`` paths, with their sha256 when the exporter wrote them). :func:`models_folder_for` composes
``<data_dir>/models/<version>/`` from the base folder (``[models] dir``, default the built models) with
every embedder entry replaced by the version's files, so the manifest names the exact embedder (sha256)
that the re-embedded gallery belongs to. A promoted liveness head (``facegate train liveness``, registry
kind ``liveness``) adds its two entries, ``liveness-features`` and ``liveness-head`` (role ``liveness``),
in ``<data_dir>/models/<embedder version or "base">+<liveness version>/``: the doors' passive check
scores with it (``device.liveness.trained``). The folder is built in a temp folder and renamed, and
reused (after a sha256 check) on the next promotion or rollback to that combination.

Light on purpose (LiteRT, no TensorFlow): the server imports it at startup (:func:`active_models_dir`).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from core.files import sha256_file
from device.liveness.passive import PassiveModelError
from device.liveness.trained import DEFAULT_SCALE, FEATURES_ENTRY, HEAD_ENTRY, TrainedHead
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
from server.training.liveness import FEATURES_FILE, HEAD_FILE

logger = logging.getLogger(__name__)

MODELS_SUBDIR = "models"
SOURCE_PACKAGE = "facegate-registry"
UNKNOWN_LICENSE = "unspecified: trained by facegate (see the registry entry and its data)"
# The liveness head: MiniFASNet-2.7's weights (Apache-2.0) with a head fitted by facegate.
LIVENESS_LICENSE = "Apache-2.0 (MiniFASNet, Minivision); head fitted by facegate (see the registry entry)"
LIVENESS_ENTRIES = (FEATURES_ENTRY, HEAD_ENTRY)
BASE_NAME = "base"  # folder-name stand-in for the base folder's embedder


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


def liveness_artifacts(report: Path) -> dict[str, Any]:
    """The registry artifacts of a ``facegate train liveness`` report: both files with their sha256."""
    export = report / "export"
    out: dict[str, Any] = {}
    for key, file in (("features", FEATURES_FILE), ("head", HEAD_FILE)):
        path = export / file
        if not path.is_file():
            raise ModelFolderError(f"{report} has no {path.relative_to(report)}: not a liveness report")
        out[key], out[f"{key}_sha256"] = str(path.resolve()), sha256_file(path)
    return out


def _liveness_entries(tmp: Path, version: ModelVersion) -> list[ModelEntry]:
    """Copy a liveness version's features model and head into ``tmp`` and describe them (both loaded)."""
    from models.convert.export import tensor_specs  # LiteRT only; TensorFlow stays unimported

    entries = []
    for key, name in (("features", FEATURES_ENTRY), ("head", HEAD_ENTRY)):
        src = _artifact(version, key)
        if src is None:
            raise ModelFolderError(f"{version.version} has no {key} artifact")
        file = f"{name}.tflite"
        shutil.copy2(src, tmp / file)
        inputs, outputs = tensor_specs(tmp / file)
        extra = {"registry_version": version.version,
                 "base_model": str(version.metrics.get("base_model", ""))}
        if key == "features":
            extra["scale"] = str(DEFAULT_SCALE)
        entries.append(ModelEntry(name=name, role="liveness", version=version.version, file=file,
                                  sha256=sha256_file(tmp / file), size=(tmp / file).stat().st_size,
                                  inputs=inputs, outputs=outputs, source_package=SOURCE_PACKAGE,
                                  source_version=version.version, license=LIVENESS_LICENSE, extra=extra))
    try:
        TrainedHead(tmp / entries[0].file, tmp / entries[1].file).close()
    except (PassiveModelError, ValueError, RuntimeError) as exc:
        raise ModelFolderError(f"{version.version}: not a usable liveness head: {exc}") from exc
    return entries


def folder_name(embedder: ModelVersion | None, liveness: ModelVersion | None) -> str:
    """The folder of a combination: the embedder's version, with ``+<liveness version>`` when one is set."""
    if liveness is None:
        if embedder is None:
            raise ModelFolderError("neither an embedder nor a liveness version to compose")
        return embedder.version
    return f"{embedder.version if embedder is not None else BASE_NAME}+{liveness.version}"


def models_folder_for(config: ServerConfig, version: ModelVersion | None,
                      liveness: ModelVersion | None = None) -> Path:
    """The models folder of an embedder ``version`` (None: the base folder's embedder) and, when given,
    a promoted ``liveness`` head (composed on first use); else ModelFolderError."""
    if version is not None and version.kind != "embedder":
        raise ModelFolderError(f"{version.version} is a {version.kind}, not an embedder")
    if liveness is not None and liveness.kind != "liveness":
        raise ModelFolderError(f"{liveness.version} is a {liveness.kind}, not a liveness head")
    dest = version_models_dir(config, folder_name(version, liveness))
    if (dest / MANIFEST_NAME).is_file():
        try:
            _verified(dest)
        except ManifestError as exc:
            raise ModelFolderError(f"models folder {dest} is damaged: {exc}; delete it to compose it "
                                   "again") from exc
        return dest
    base_dir = config.models.dir or default_models_dir()
    try:
        base = _verified(base_dir)
    except ManifestError as exc:
        raise ModelFolderError(f"base models folder {base_dir}: {exc}") from exc
    sources = {} if version is None else {name: src for variant, name in EMBEDDER_ENTRIES.items()
                                          if (src := _artifact(version, variant)) is not None}
    wanted = embedder_entry_name(config)
    if version is not None and wanted not in sources:
        raise ModelFolderError(f"{version.version} has no {config.models.embedder} embedder artifact "
                               f"(artifacts: {sorted(version.artifacts)}); the doors run {wanted}")
    replaced = {"embedder"} if version is not None else set()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        entries = []
        for entry in base.models:
            if entry.role in replaced or entry.name in LIVENESS_ENTRIES:
                continue
            target = tmp / entry.file
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(base_dir / entry.file, target)
            entries.append(entry)
        if version is not None:
            for name, src in sources.items():
                old = base.get(name) if base.has(name) else None
                entries.append(_embedder_entry(tmp, name, src, version, old))
        if liveness is not None:
            entries.extend(_liveness_entries(tmp, liveness))
        save_manifest(tmp, Manifest(created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                                    models=entries))
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("models folder %s composed in %s", dest.name, dest)
    return dest


def active_models_dir(config: ServerConfig, database: Database) -> Path | None:
    """The models folder of the promoted embedder and liveness head, or None before the first promotion
    (use ``[models] dir``)."""
    registry = ModelRegistry(database)
    current, liveness = registry.current("embedder"), registry.current("liveness")
    if current is None and liveness is None:
        return None
    folder = version_models_dir(config, folder_name(current, liveness))
    if not (folder / MANIFEST_NAME).is_file():
        logger.warning("promoted models have no folder at %s; running [models] dir instead (promote or "
                       "roll back again to compose it)", folder)
        return None
    return folder
