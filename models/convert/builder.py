"""``build_all``: build every model artifact into a folder and write its ``manifest.json``.

Work already done is skipped: each artifact's build key (sha256 of its source files, the converter
version and its other inputs) is kept in ``.build-stamp.json``; an artifact whose key matches and
whose file still has the sha256 the previous manifest recorded is reused as it is. Builds of the
same folder are serialised by a lock file; every file is written atomically.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from core.files import atomic_write_bytes
from models.convert.artifacts import Artifact, BuildError, EmbedderBuild, packaged_artifacts
from models.convert.cards import write_cards
from models.runtime.manifest import (
    MANIFEST_NAME,
    Manifest,
    ManifestError,
    ModelEntry,
    load_manifest,
    save_manifest,
    verify_entry,
)

logger = logging.getLogger(__name__)

STAMP_NAME = ".build-stamp.json"
LOCK_NAME = ".build.lock"
# Entries built only when their source folder is given (MiniFASNet): a later build without that folder
# keeps them while their files are intact, so a plain `models build` never drops what another run added.
OPTIONAL_ROLES = {"liveness": "minifasnet.md"}


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``out`` so two builds never interleave their writes."""
    with open(out / LOCK_NAME, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _read_stamp(out: Path) -> dict[str, str]:
    try:
        raw = json.loads((out / STAMP_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    keys = raw.get("keys", {}) if isinstance(raw, dict) else {}
    return {str(k): str(v) for k, v in keys.items()} if isinstance(keys, dict) else {}


def _previous(out: Path) -> Manifest | None:
    if not (out / MANIFEST_NAME).is_file():
        return None
    try:
        return load_manifest(out)
    except ManifestError as exc:
        logger.warning("ignoring the previous manifest: %s", exc)
        return None


def _reusable(out: Path, art: Artifact, key: str, stamp: dict[str, str],
              previous: Manifest | None) -> ModelEntry | None:
    """The previous entry when its key matches and its file is intact, else None."""
    if previous is None or stamp.get(art.name) != key or not previous.has(art.name):
        return None
    entry = previous.get(art.name)
    try:
        verify_entry(out, entry)
    except ManifestError as exc:
        logger.info("rebuilding %s: %s", art.name, exc)
        return None
    return entry


def _kept_optional(out: Path, previous: Manifest | None, current: set[str]) -> list[ModelEntry]:
    """Previous optional entries (see OPTIONAL_ROLES) this build does not cover, with intact files."""
    kept = []
    for entry in previous.models if previous is not None else []:
        if entry.role not in OPTIONAL_ROLES or entry.name in current:
            continue
        try:
            verify_entry(out, entry)
        except ManifestError as exc:
            logger.info("dropping %s: %s", entry.name, exc)
            continue
        logger.info("keeping %s from a previous build (its source folder was not given)", entry.name)
        kept.append(entry)
    return kept


class _Bar:
    """A rich progress bar on stderr, or nothing when progress is off."""

    def __init__(self, enabled: bool, total: int) -> None:
        self._progress: Any = None
        self._task: Any = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                      TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                                      console=Console(stderr=True))
            self._progress.start()
            self._task = self._progress.add_task("models", total=total)

    def step(self, description: str) -> None:
        """Show what is being done now."""
        if self._progress is not None:
            self._progress.update(self._task, description=description)

    def advance(self) -> None:
        """One artifact done."""
        if self._progress is not None:
            self._progress.advance(self._task)

    def close(self) -> None:
        """Stop drawing (idempotent)."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def build_all(out: Path, minifasnet_dir: Path | None = None, calibration_dir: Path | None = None,
              progress: bool = True) -> Path:
    """Build (or reuse) every model into ``out`` and return the path of ``out/manifest.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if calibration_dir is not None and not Path(calibration_dir).is_dir():
        raise BuildError(f"calibration folder {calibration_dir} does not exist")
    started = time.monotonic()
    with _locked(out):
        previous, stamp = _previous(out), _read_stamp(out)
        arts = [*EmbedderBuild(calibration_dir).artifacts(), *packaged_artifacts(minifasnet_dir)]
        entries: list[ModelEntry] = []
        keys: dict[str, str] = {}
        built: list[str] = []
        bar = _Bar(progress, len(arts))
        try:
            for art in arts:
                bar.step(f"checking {art.name}")
                key = art.key()
                entry = _reusable(out, art, key, stamp, previous)
                if entry is None:
                    bar.step(f"building {art.name}")
                    t0 = time.monotonic()
                    entry = art.build(out)
                    built.append(art.name)
                    logger.info("built %s in %.1f s (%d bytes)", art.name, time.monotonic() - t0, entry.size)
                else:
                    logger.info("%s is up to date", art.name)
                entries.append(entry)
                keys[art.name] = key
                bar.advance()
        finally:
            bar.close()
        for entry in _kept_optional(out, previous, {a.name for a in arts}):
            entries.append(entry)
            keys[entry.name] = stamp.get(entry.name, "")
        manifest_path = out / MANIFEST_NAME
        unchanged = (previous is not None and not built
                     and [e.name for e in previous.models] == [e.name for e in entries])
        if not unchanged or previous is None:
            manifest = Manifest(created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), models=entries)
            manifest_path = save_manifest(out, manifest)
            stamp_doc = {"keys": keys, "built": built, "seconds": round(time.monotonic() - started, 1)}
            atomic_write_bytes(out / STAMP_NAME, json.dumps(stamp_doc, indent=2).encode("utf-8"))
        else:
            manifest = previous
        cards = {e.name: OPTIONAL_ROLES[e.role] for e in manifest.models if e.role in OPTIONAL_ROLES}
        write_cards(out, manifest, {**cards, **{a.name: a.card for a in arts}})
        logger.info("models in %s: %d built, %d reused, %.1f s", out, len(built), len(entries) - len(built),
                    time.monotonic() - started)
    return manifest_path
