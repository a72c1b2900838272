"""The model registry in the server database: versions, metrics, lineage, promote, rollback, list.

Tables live on the server's declarative ``Base`` (``server.db.models``); the migrations create them
(``server.db.migrate``), and ``ModelRegistry`` migrates the database it opens. One version per
kind is ``promoted`` at a time; promoting records which version it replaced so rollback can restore it.
Every registration, promotion, refusal and rollback is an event row (nothing changes silently).
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import JSON, ForeignKey, Integer, String, Text, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Mapped, Session, mapped_column

from server.db.models import ID_LEN, Base, new_id, utcnow
from server.db.session import Database, DatabaseError

logger = logging.getLogger(__name__)

VERSION_LEN = 64
KINDS = ("embedder", "pairs-head", "liveness")
TABLE_VERSIONS = "model_versions"
TABLE_EVENTS = "model_registry_events"


class RegistryError(Exception):
    """A registry operation cannot be done (unknown version, nothing to roll back to, database error)."""


class Status(enum.StrEnum):
    """Life cycle of a model version."""

    CANDIDATE = "candidate"
    PROMOTED = "promoted"
    RETIRED = "retired"  # was promoted, replaced by a newer promotion
    ROLLED_BACK = "rolled_back"  # was promoted, withdrawn by a rollback
    REFUSED = "refused"  # the gate said no (the candidate may be retried after fixing)


class ModelVersionRow(Base):
    """One registered model version and its lineage."""

    __tablename__ = TABLE_VERSIONS

    id: Mapped[str] = mapped_column(String(ID_LEN), primary_key=True, default=new_id)
    version: Mapped[str] = mapped_column(String(VERSION_LEN), unique=True, index=True)
    kind: Mapped[str] = mapped_column(String(32), index=True)
    number: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default=Status.CANDIDATE.value, index=True)
    parent_version: Mapped[str | None] = mapped_column(String(VERSION_LEN))
    replaces_version: Mapped[str | None] = mapped_column(String(VERSION_LEN))
    data_hash: Mapped[str] = mapped_column(String(64), default="")
    hyperparams: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    artifacts: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    note: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    promoted_at: Mapped[dt.datetime | None]


class ModelEventRow(Base):
    """Append-only history of registry actions."""

    __tablename__ = TABLE_EVENTS

    id: Mapped[str] = mapped_column(String(ID_LEN), primary_key=True, default=new_id)
    version_id: Mapped[str] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"), index=True)
    action: Mapped[str] = mapped_column(String(32))
    actor: Mapped[str] = mapped_column(String(64), default="cli")
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    at: Mapped[dt.datetime] = mapped_column(default=utcnow)


@dataclass(frozen=True, slots=True)
class ModelVersion:
    """A detached, read-only view of a registry row."""

    version: str
    kind: str
    status: str
    parent_version: str | None
    replaces_version: str | None
    data_hash: str
    hyperparams: dict[str, Any]
    metrics: dict[str, Any]
    artifacts: dict[str, Any]
    note: str
    created_at: dt.datetime
    promoted_at: dt.datetime | None

    @classmethod
    def of(cls, row: ModelVersionRow) -> ModelVersion:
        """View of a row."""
        return cls(row.version, row.kind, row.status, row.parent_version, row.replaces_version, row.data_hash,
                   dict(row.hyperparams or {}), dict(row.metrics or {}), dict(row.artifacts or {}), row.note,
                   row.created_at, row.promoted_at)


class ModelRegistry:
    """Registry operations on one database; a context manager (closes the database it opened)."""

    def __init__(self, database: Database, owns: bool = False) -> None:
        self.db, self._owns = database, owns
        try:
            self.db.migrate()
        except DatabaseError as exc:
            raise RegistryError(f"cannot migrate the registry's database: {exc}") from exc

    @classmethod
    def open(cls, url: str) -> ModelRegistry:
        """Open the registry on a SQLAlchemy URL (the server's database)."""
        return cls(Database(url), owns=True)

    def close(self) -> None:
        """Close the database when this registry opened it (safe to call twice)."""
        if self._owns:
            self.db.close()

    def __enter__(self) -> ModelRegistry:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @staticmethod
    def _row(session: Session, version: str) -> ModelVersionRow:
        row = session.scalars(select(ModelVersionRow).where(ModelVersionRow.version == version)).first()
        if row is None:
            raise RegistryError(f"no model version {version!r} in the registry (see `facegate models list`)")
        return row

    @staticmethod
    def _event(session: Session, row: ModelVersionRow, action: str, actor: str, **detail: Any) -> None:
        session.add(ModelEventRow(version_id=row.id, action=action, actor=actor, detail=detail))

    def register(self, kind: str, *, metrics: dict[str, Any], artifacts: dict[str, Any],
                 hyperparams: dict[str, Any], data_hash: str = "", parent: str | None = None,
                 note: str = "", actor: str = "cli") -> ModelVersion:
        """Add a candidate version ``<kind>-v<n>`` and return it."""
        if kind not in KINDS:
            raise RegistryError(f"unknown model kind {kind!r}; one of {', '.join(KINDS)}")
        try:
            with self.db.transaction() as session:
                if parent is not None:
                    self._row(session, parent)
                last = session.scalar(select(func.max(ModelVersionRow.number))
                                      .where(ModelVersionRow.kind == kind))
                number = int(last or 0) + 1
                row = ModelVersionRow(version=f"{kind}-v{number}", kind=kind, number=number,
                                      parent_version=parent, data_hash=data_hash, hyperparams=hyperparams,
                                      metrics=metrics, artifacts=artifacts, note=note)
                session.add(row)
                session.flush()
                self._event(session, row, "register", actor, parent=parent)
                view = ModelVersion.of(row)
        except SQLAlchemyError as exc:
            raise RegistryError(f"cannot register a {kind}: {exc}") from exc
        logger.info("registered %s (parent %s)", view.version, parent)
        return view

    def get(self, version: str) -> ModelVersion:
        """One version or RegistryError."""
        with self.db.session() as session:
            return ModelVersion.of(self._row(session, version))

    def current(self, kind: str = "embedder") -> ModelVersion | None:
        """The promoted version of ``kind`` (None before the first promotion)."""
        with self.db.session() as session:
            row = session.scalars(select(ModelVersionRow).where(
                ModelVersionRow.kind == kind, ModelVersionRow.status == Status.PROMOTED.value)).first()
            return None if row is None else ModelVersion.of(row)

    def versions(self, kind: str | None = None) -> list[ModelVersion]:
        """Every version (of ``kind``), oldest first."""
        query = select(ModelVersionRow).order_by(ModelVersionRow.kind, ModelVersionRow.number)
        if kind is not None:
            query = query.where(ModelVersionRow.kind == kind)
        with self.db.session() as session:
            return [ModelVersion.of(r) for r in session.scalars(query)]

    def events(self, version: str) -> list[dict[str, Any]]:
        """The action history of one version, oldest first."""
        with self.db.session() as session:
            row = self._row(session, version)
            rows = session.scalars(select(ModelEventRow).where(ModelEventRow.version_id == row.id)
                                   .order_by(ModelEventRow.at))
            return [{"action": e.action, "actor": e.actor, "detail": dict(e.detail or {}),
                     "at": e.at.isoformat()} for e in rows]

    def mark_promoted(self, version: str, actor: str = "cli", **detail: Any) -> ModelVersion | None:
        """Make ``version`` the promoted one of its kind; return the version it replaced."""
        with self.db.transaction() as session:
            row = self._row(session, version)
            previous = session.scalars(select(ModelVersionRow).where(
                ModelVersionRow.kind == row.kind, ModelVersionRow.status == Status.PROMOTED.value)).first()
            replaced = None
            if previous is not None and previous.id != row.id:
                previous.status = Status.RETIRED.value
                self._event(session, previous, "retire", actor, by=version)
                replaced = ModelVersion.of(previous)
            row.status = Status.PROMOTED.value
            row.promoted_at = utcnow()
            row.replaces_version = None if replaced is None else replaced.version
            self._event(session, row, "promote", actor, replaces=row.replaces_version, **detail)
        logger.warning("promoted %s (replaces %s)", version, None if replaced is None else replaced.version)
        return replaced

    def undo_promotion(self, version: str, restore: str | None, actor: str = "cli", reason: str = "") -> None:
        """Undo a promotion whose hooks failed: ``version`` is a candidate, ``restore`` promoted again."""
        with self.db.transaction() as session:
            row = self._row(session, version)
            row.status = Status.CANDIDATE.value
            row.promoted_at = None
            row.replaces_version = None
            self._event(session, row, "undo-promote", actor, reason=reason, restored=restore)
            if restore is not None:
                previous = self._row(session, restore)
                previous.status = Status.PROMOTED.value
                self._event(session, previous, "restore", actor, withdrawn=version)
        logger.warning("promotion of %s undone (%s): %s", version,
                       "nothing promoted" if restore is None else f"{restore} promoted again", reason)

    def record_refusal(self, version: str, reasons: list[str], actor: str = "cli") -> None:
        """Mark a candidate refused by the gate, with the reasons."""
        with self.db.transaction() as session:
            row = self._row(session, version)
            if row.status == Status.CANDIDATE.value:
                row.status = Status.REFUSED.value
            self._event(session, row, "refuse", actor, reasons=reasons)
        logger.warning("refused to promote %s: %s", version, "; ".join(reasons))

    def withdraw(self, kind: str, actor: str = "cli") -> ModelVersion:
        """Withdraw the promoted version of ``kind`` when it replaced nothing: none of that kind is promoted
        afterwards (a liveness head's rollback to the shipped scorer). Return the withdrawn version."""
        with self.db.transaction() as session:
            current = session.scalars(select(ModelVersionRow).where(
                ModelVersionRow.kind == kind, ModelVersionRow.status == Status.PROMOTED.value)).first()
            if current is None:
                raise RegistryError(f"no promoted {kind} to withdraw")
            if current.replaces_version is not None:
                raise RegistryError(f"{current.version} replaced {current.replaces_version}: roll back to it")
            current.status = Status.ROLLED_BACK.value
            self._event(session, current, "withdraw", actor)
            withdrawn = ModelVersion.of(current)
        logger.warning("withdrew %s: no %s is promoted now", withdrawn.version, kind)
        return withdrawn

    def rollback(self, kind: str = "embedder", actor: str = "cli") -> tuple[ModelVersion, ModelVersion]:
        """Withdraw the promoted version and restore the one it replaced; return (withdrawn, restored)."""
        with self.db.transaction() as session:
            current = session.scalars(select(ModelVersionRow).where(
                ModelVersionRow.kind == kind, ModelVersionRow.status == Status.PROMOTED.value)).first()
            if current is None:
                raise RegistryError(f"no promoted {kind} to roll back")
            if current.replaces_version is None:
                raise RegistryError(f"{current.version} replaced nothing: "
                                    f"there is no earlier {kind} to restore")
            restored = self._row(session, current.replaces_version)
            current.status = Status.ROLLED_BACK.value
            restored.status = Status.PROMOTED.value
            restored.promoted_at = utcnow()
            self._event(session, current, "rollback", actor, restored=restored.version)
            self._event(session, restored, "restore", actor, withdrawn=current.version)
            result = (ModelVersion.of(current), ModelVersion.of(restored))
        logger.warning("rolled back %s to %s", result[0].version, result[1].version)
        return result
