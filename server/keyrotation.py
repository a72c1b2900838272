"""Rotate the chip key: re-encrypt every chip and template under a new AES-256-GCM key.

Order of operations (crash-safe, and safe to rerun):

1. The new key is written first, next to the key file, as ``<key file>.new`` (mode 0600, fsynced).
   A key in the environment instead gets its successor written to the file the operator names.
   Before that, every row is opened once: a tampered or foreign row stops everything with nothing changed.
2. Rows are re-encrypted in batches, each batch one transaction. A row already under the new key id is
   skipped, so a rerun after a crash finishes the job instead of failing on half-rotated data.
   The gallery delta ledger (``<bundles root>/delta_state.json``, names and templates) is re-sealed too;
   the gallery keyring makes a new key version by itself (``server.bundles.sitekeys``).
3. Only when no row is left under the old key: the old key file is kept as ``<key file>.old-<key id>``
   and ``.new`` takes its place (two renames in the same folder).

Stop the server first: a running server would keep sealing new chips with the old key. Each rotation is
audited with counts and key ids (fingerprints, never keys).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.files import atomic_write_bytes
from server.audit.log import AuditAction, record
from server.config import ServerConfig
from server.crypto import KEY_FILE_MODE, ChipCipher, CryptoError, cipher_from_text, generate_key_text
from server.db.models import AuditEntry, Chip, Template
from server.db.session import Database
from server.enrollment.sync import SyncError
from server.enrollment.templates import template_associated
from server.rowbinding import chip_associated

logger = logging.getLogger(__name__)

NEW_SUFFIX = ".new"
BATCH_ROWS = 256


class KeyRotationError(Exception):
    """The rotation cannot start or finish (no key, wrong key, a row that does not decrypt)."""


@dataclass(frozen=True, slots=True)
class RotationReport:
    """What a rotation did."""

    old_key_id: str
    new_key_id: str
    chips: int
    templates: int
    skipped: int
    key_file: Path
    retired_key_file: Path | None
    ledger_resealed: bool = False  # the gallery delta ledger was re-sealed under the new key


def _read_key(path: Path) -> ChipCipher:
    try:
        return cipher_from_text(path.read_text(encoding="ascii"), str(path))
    except OSError as exc:
        raise KeyRotationError(f"cannot read the key file {path}: {exc.strerror}") from exc


def _new_key(path: Path) -> ChipCipher:
    """The successor key at ``path``: reused when a previous run left it, else created (0600)."""
    if path.is_file():
        logger.warning("continuing an interrupted rotation with the new key in %s", path)
        return _read_key(path)
    atomic_write_bytes(path, generate_key_text().encode("ascii") + b"\n", mode=KEY_FILE_MODE)
    return _read_key(path)


def _associated(row: Chip | Template) -> tuple[str, str]:
    """(associated data, record kind) a row's ciphertext is bound to."""
    if isinstance(row, Chip):
        return chip_associated(row.id, row.person_id), "chip"
    return template_associated(row.id, row.person_id, row.model_sha256), "template"


def _rows(session: Session, kind: str, ids: list[str]) -> Sequence[Chip | Template]:
    if kind == "chips":
        return session.scalars(select(Chip).where(Chip.id.in_(ids))).all()
    return session.scalars(select(Template).where(Template.id.in_(ids))).all()


def _preflight(db: Database, old: ChipCipher, staged: ChipCipher | None) -> None:
    """Open every row before changing any: a tampered or foreign row stops the rotation with nothing done."""
    ciphers = {old.key_id.hex(): old} | ({} if staged is None else {staged.key_id.hex(): staged})
    with db.session() as session:
        for rows in (session.scalars(select(Chip)), session.scalars(select(Template))):
            for row in rows:
                cipher = ciphers.get(row.key_id)
                if cipher is None:
                    raise KeyRotationError(f"{_associated(row)[1]} {row.id} is under key {row.key_id}, not "
                                           f"the configured key {old.key_id.hex()}: nothing was changed")
                associated, what = _associated(row)
                try:
                    cipher.decrypt(row.ciphertext, associated, what)
                except CryptoError as exc:
                    raise KeyRotationError(f"{exc}; nothing was changed") from exc


def _rotate_rows(db: Database, old: ChipCipher, new: ChipCipher,
                 progress: Callable[[int], None] | None) -> tuple[int, int, int]:
    """Re-encrypt chips and templates in batches; return (chips, templates, already rotated)."""
    old_id, new_id = old.key_id.hex(), new.key_id.hex()
    counts = {"chips": 0, "templates": 0, "skipped": 0}
    for kind, id_column in (("chips", Chip.id), ("templates", Template.id)):
        with db.session() as session:
            ids = list(session.scalars(select(id_column).order_by(id_column)))
        for start in range(0, len(ids), BATCH_ROWS):
            batch = ids[start:start + BATCH_ROWS]
            with db.transaction() as session:
                for row in _rows(session, kind, batch):
                    if row.key_id == new_id:
                        counts["skipped"] += 1
                        continue
                    if row.key_id != old_id:
                        raise KeyRotationError(f"{kind[:-1]} {row.id} is under key {row.key_id}, neither the "
                                               f"configured key {old_id} nor the new one {new_id}")
                    associated, what = _associated(row)
                    try:
                        plain = old.decrypt(row.ciphertext, associated, what)
                    except CryptoError as exc:
                        raise KeyRotationError(f"rotation stopped (this batch is unchanged): {exc}") from exc
                    row.ciphertext = new.encrypt(plain, associated)
                    row.key_id = new_id
                    counts[kind] += 1
            if progress is not None:
                progress(len(batch))
    return counts["chips"], counts["templates"], counts["skipped"]


def rows_not_under(db: Database, key_id_hex: str) -> int:
    """How many chips and templates are sealed under any key but ``key_id_hex``."""
    with db.session() as session:
        chips = session.scalar(select(func.count()).select_from(Chip).where(Chip.key_id != key_id_hex)) or 0
        templates = session.scalar(select(func.count()).select_from(Template)
                                   .where(Template.key_id != key_id_hex)) or 0
    return int(chips) + int(templates)


def retired_key_files(config: ServerConfig) -> list[Path]:
    """Old key files a rotation kept next to the key file (``<key file>.old-<key id>``)."""
    key_file = config.chip_key_path
    return sorted(key_file.parent.glob(f"{key_file.name}.old-*")) if key_file.parent.is_dir() else []


def remove_retired_key(config: ServerConfig, db: Database, path: Path, actor: str = "cli") -> str:
    """Delete one retired key file after a confirmed rotation; return its key id.

    Confirmed means: the audit log records a finished rotation away from this key, the installed key
    opens the rows, and no chip or template is left under the retired key.
    """
    retired = _read_key(path)
    old_id = retired.key_id.hex()
    current = load_current_cipher(config)
    if current.key_id == retired.key_id:
        raise KeyRotationError(f"{path} holds the installed key; it cannot be removed")
    with db.session() as session:
        rotations = session.scalars(select(AuditEntry)
                                    .where(AuditEntry.action == AuditAction.KEY_ROTATED.value))
        confirmed = any(row.data.get("old_key_id") == old_id for row in rotations)
    if not confirmed:
        raise KeyRotationError(f"no finished rotation away from key {old_id} in the audit log: kept {path}")
    left = rows_not_under(db, current.key_id.hex())
    if left:
        raise KeyRotationError(f"{left} row(s) are not under the installed key: kept {path}")
    _preflight(db, current, None)  # every row opens with the installed key
    size = path.stat().st_size
    with open(path, "r+b") as handle:  # overwrite before unlinking (best effort on journaling filesystems)
        handle.write(b"\0" * size)
        handle.flush()
        os.fsync(handle.fileno())
    path.unlink()
    with db.transaction() as session:
        record(session, actor, AuditAction.KEY_ROTATED, f"retired chip key {old_id} removed",
               data={"removed_key_id": old_id})
    return old_id


def load_current_cipher(config: ServerConfig) -> ChipCipher:
    """The installed chip key (environment or key file)."""
    if config.crypto.chip_key is not None:
        return cipher_from_text(config.crypto.chip_key.get_secret_value(), "the environment")
    return _read_key(config.chip_key_path)


def rows_to_rotate(db: Database) -> int:
    """How many chips and templates exist (the progress total)."""
    with db.session() as session:
        chips = session.scalar(select(func.count()).select_from(Chip)) or 0
        templates = session.scalar(select(func.count()).select_from(Template)) or 0
    return int(chips) + int(templates)


def rotate_chip_key(config: ServerConfig, db: Database, *, new_key_file: Path | None = None,
                    actor: str = "cli", progress: Callable[[int], None] | None = None) -> RotationReport:
    """Re-encrypt everything under a new key and install it (see the module docstring for the order)."""
    key_file = config.chip_key_path
    from_env = config.crypto.chip_key is not None
    if config.crypto.chip_key is not None:
        if new_key_file is None:
            raise KeyRotationError("the chip key comes from FACEGATE_SERVER__CRYPTO__CHIP_KEY: name a file "
                                   "for the new key with --new-key-file, then put its content in the env")
        old = cipher_from_text(config.crypto.chip_key.get_secret_value(), "the environment")
        staged = new_key_file
    else:
        if not key_file.is_file():
            raise KeyRotationError(f"no chip key file at {key_file}: nothing is encrypted yet, or the key is "
                                   "elsewhere (set [crypto] chip_key_file)")
        old = _read_key(key_file)
        staged = new_key_file or key_file.with_name(key_file.name + NEW_SUFFIX)
    _preflight(db, old, _read_key(staged) if staged.is_file() else None)
    new = _new_key(staged)
    if new.key_id == old.key_id:
        raise KeyRotationError(f"the new key in {staged} is the current key")
    chips, templates, skipped = _rotate_rows(db, old, new, progress)
    from server.bundles.delta import reseal_ledger  # the gallery delta ledger is sealed under the chip key

    try:
        resealed = reseal_ledger(config.bundles_root, old, new)
    except SyncError as exc:
        raise KeyRotationError(f"the gallery delta ledger cannot be re-sealed ({exc}); the old key stays "
                               "installed") from exc
    left = rows_not_under(db, new.key_id.hex())
    if left:  # the promised check: nothing may still need the old key before it is retired
        raise KeyRotationError(f"{left} row(s) are not under the new key {new.key_id.hex()} (written while "
                               "rotating? stop the server and rerun); the old key stays installed")
    retired: Path | None = None
    installed = staged
    if not from_env and new_key_file is None:
        retired = key_file.with_name(f"{key_file.name}.old-{old.key_id.hex()}")
        os.replace(key_file, retired)
        os.replace(staged, key_file)
        installed = key_file
        dir_fd = os.open(key_file.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    with db.transaction() as session:
        record(session, actor, AuditAction.KEY_ROTATED,
               f"chip key {old.key_id.hex()} -> {new.key_id.hex()}: {chips} chips and {templates} templates "
               f"re-encrypted ({skipped} already were){'; delta ledger re-sealed' if resealed else ''}",
               data={"old_key_id": old.key_id.hex(), "new_key_id": new.key_id.hex(), "chips": chips,
                     "templates": templates, "skipped": skipped})
    logger.warning("chip key rotated (%s -> %s): %d chips, %d templates; new key in %s", old.key_id.hex(),
                   new.key_id.hex(), chips, templates, installed)
    return RotationReport(old.key_id.hex(), new.key_id.hex(), chips, templates, skipped, installed, retired,
                          resealed)
