"""SQLAlchemy 2 tables: persons, chips and templates per model version (both encrypted), users, tokens,
events, devices, bundle acks, the audit log and deletion requests.

The schema is migrated by Alembic (``server/db/migrations``): a change here needs a new revision there,
and ``tests/test_migrations.py`` fails until the migrated schema equals these models.

Times are stored as naive UTC and come back as aware UTC (``UTCDateTime``), the same on SQLite and
PostgreSQL. Ids the API exposes are random hex strings; uploaded filenames are never stored.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

ID_LEN = 32  # uuid4 hex
DEVICE_ID_LEN = 64
SHA256_HEX_LEN = 64


def new_id() -> str:
    """A random 32-hex-digit id."""
    return uuid.uuid4().hex


def utcnow() -> dt.datetime:
    """The current time, aware UTC."""
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Store naive UTC, return aware UTC; reject naive input so local times never sneak in."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        """Convert an aware datetime to naive UTC."""
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; use aware UTC")
        return value.astimezone(dt.UTC).replace(tzinfo=None)

    def process_result_value(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        """Attach UTC to the stored naive value."""
        return None if value is None else value.replace(tzinfo=dt.UTC)


class Base(DeclarativeBase):
    """Declarative base of every facegate table."""

    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, dt.datetime: UTCDateTime}


class Person(Base):
    """An enrolled (or about to be enrolled) person."""

    __tablename__ = "persons"

    id: Mapped[str] = mapped_column(String(ID_LEN), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200), index=True)
    external_id: Mapped[str | None] = mapped_column(String(100), unique=True)
    consent: Mapped[bool] = mapped_column(Boolean, default=False)
    consent_at: Mapped[dt.datetime | None]
    created_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    chips: Mapped[list[Chip]] = relationship(back_populates="person", cascade="all, delete-orphan")
    templates: Mapped[list[Template]] = relationship(back_populates="person", cascade="all, delete-orphan")


class Chip(Base):
    """An aligned face chip, AES-GCM encrypted (PNG inside); kept to re-embed when the model changes."""

    __tablename__ = "chips"

    id: Mapped[str] = mapped_column(String(ID_LEN), primary_key=True, default=new_id)
    person_id: Mapped[str] = mapped_column(ForeignKey("persons.id", ondelete="CASCADE"), index=True)
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    key_id: Mapped[str] = mapped_column(String(16))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    source: Mapped[str] = mapped_column(String(16), default="upload")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    person: Mapped[Person] = relationship(back_populates="chips")
    templates: Mapped[list[Template]] = relationship(back_populates="chip", cascade="all, delete-orphan")


class Template(Base):
    """One embedding of one chip by one embedder (``model_sha256``), with its quality figures.

    The float32 vector is AES-GCM encrypted like the chips (``ciphertext``, bound to id, person and
    model); seal and open it only through ``server.enrollment.templates``.
    """

    __tablename__ = "templates"
    __table_args__ = (UniqueConstraint("chip_id", "model_sha256", name="uq_template_chip_model"),)

    id: Mapped[str] = mapped_column(String(ID_LEN), primary_key=True, default=new_id)
    person_id: Mapped[str] = mapped_column(ForeignKey("persons.id", ondelete="CASCADE"), index=True)
    chip_id: Mapped[str | None] = mapped_column(ForeignKey("chips.id", ondelete="CASCADE"), index=True)
    model_sha256: Mapped[str] = mapped_column(String(SHA256_HEX_LEN), index=True)
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    key_id: Mapped[str] = mapped_column(String(16))
    dim: Mapped[int] = mapped_column(Integer)
    quality: Mapped[dict[str, Any]] = mapped_column(default=dict)
    consistency: Mapped[float | None] = mapped_column(Float)
    flagged: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    person: Mapped[Person] = relationship(back_populates="templates")
    chip: Mapped[Chip | None] = relationship(back_populates="templates")


class User(Base):
    """A web/API user with an argon2 password hash and a role."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16))
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    tokens: Mapped[list[ApiToken]] = relationship(back_populates="user", cascade="all, delete-orphan")


class ApiToken(Base):
    """A bearer token, stored only as its sha256."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(SHA256_HEX_LEN), unique=True)
    name: Mapped[str] = mapped_column(String(100), default="login")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[dt.datetime | None]
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)

    user: Mapped[User] = relationship(back_populates="tokens")


class EventRow(Base):
    """A device access event; ``event_id`` is unique so redelivery inserts nothing."""

    __tablename__ = "events"
    __table_args__ = (
        Index("ix_events_device_ts", "device_id", "ts"),
        Index("ix_events_person_ts", "person_id", "ts"),
        Index("ix_events_kind_ts", "kind", "ts"),  # revision 0002: the list filtered by kind, newest first
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(64), unique=True)
    device_id: Mapped[str] = mapped_column(String(DEVICE_ID_LEN))
    kind: Mapped[str] = mapped_column(String(16))
    person_id: Mapped[str | None] = mapped_column(String(64))
    person_name: Mapped[str | None] = mapped_column(String(200))
    score: Mapped[float | None] = mapped_column(Float)
    margin: Mapped[float | None] = mapped_column(Float)
    liveness: Mapped[str | None] = mapped_column(String(16))
    ts: Mapped[dt.datetime] = mapped_column(index=True)
    received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)


class Device(Base):
    """A door device as last reported: availability, status, versions."""

    __tablename__ = "devices"

    device_id: Mapped[str] = mapped_column(String(DEVICE_ID_LEN), primary_key=True)
    available: Mapped[str] = mapped_column(String(8), default="unknown")
    available_at: Mapped[dt.datetime | None]
    last_seen: Mapped[dt.datetime | None]
    status: Mapped[dict[str, Any]] = mapped_column(default=dict)
    software_version: Mapped[str | None] = mapped_column(String(64))
    model_version: Mapped[str | None] = mapped_column(String(128))
    gallery_version: Mapped[str | None] = mapped_column(String(128))
    bundle_sequence: Mapped[int | None] = mapped_column(Integer)
    delta_sequence: Mapped[int | None] = mapped_column(Integer)


class BundleAckRow(Base):
    """A device's latest acknowledgement of one bundle (``kind="bundle"``) or gallery delta (``"delta"``)."""

    __tablename__ = "bundle_acks"
    __table_args__ = (UniqueConstraint("device_id", "kind", "sequence", name="uq_ack_device_kind_sequence"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(DEVICE_ID_LEN), index=True)
    kind: Mapped[str] = mapped_column(String(8))
    sequence: Mapped[int] = mapped_column(Integer, index=True)
    state: Mapped[str] = mapped_column(String(32))
    percent: Mapped[float | None] = mapped_column(Float)
    detail: Mapped[str] = mapped_column(Text, default="")
    at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class AuditEntry(Base):
    """Who did what to whom, when (enrollments with the consent flag, deletions with device confirmations)."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(32), index=True)
    person_id: Mapped[str | None] = mapped_column(String(ID_LEN), index=True)
    subject: Mapped[str | None] = mapped_column(String(200))
    consent: Mapped[bool | None] = mapped_column(Boolean)
    detail: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)


class DeletionRequest(Base):
    """A person's erasure: purged locally at once, confirmed once every expected device acked the delta."""

    __tablename__ = "deletion_requests"

    id: Mapped[str] = mapped_column(String(ID_LEN), primary_key=True, default=new_id)
    person_id: Mapped[str] = mapped_column(String(ID_LEN), index=True)
    requested_by: Mapped[str] = mapped_column(String(64))
    requested_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    template_ids: Mapped[list[str]] = mapped_column(JSON, default=list)
    delta_sequence: Mapped[int | None] = mapped_column(Integer, index=True)
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    detail: Mapped[str] = mapped_column(Text, default="")
    confirmed_at: Mapped[dt.datetime | None]

    devices: Mapped[list[DeletionDevice]] = relationship(
        back_populates="request", cascade="all, delete-orphan", order_by="DeletionDevice.device_id"
    )


class DeletionDevice(Base):
    """One device's part in a deletion: pending until it acks the removal delta."""

    __tablename__ = "deletion_devices"
    __table_args__ = (UniqueConstraint("request_id", "device_id", name="uq_deletion_device"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(ForeignKey("deletion_requests.id", ondelete="CASCADE"))
    device_id: Mapped[str] = mapped_column(String(DEVICE_ID_LEN), index=True)  # revision 0002
    state: Mapped[str] = mapped_column(String(16), default="pending")
    acked_at: Mapped[dt.datetime | None]
    detail: Mapped[str] = mapped_column(Text, default="")

    request: Mapped[DeletionRequest] = relationship(back_populates="devices")
