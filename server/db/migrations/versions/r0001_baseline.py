"""Baseline: the schema exactly as ``Base.metadata.create_all`` made it before migrations existed.

Revision ID: 0001
Revises: (none)

Every table, column, index and constraint of the pre-migration server (``server.db.models`` plus the
model registry's two tables), frozen here with plain SQLAlchemy types: later edits of the models never
change what this revision creates. ``baseline_metadata()`` is also what ``server.db.migrate`` checks a
legacy database (made by ``create_all``, no ``alembic_version``) against before stamping it at 0001.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

ID_LEN = 32
DEVICE_ID_LEN = 64
SHA256_HEX_LEN = 64
VERSION_LEN = 64


def _fk(target: str) -> sa.ForeignKey:
    return sa.ForeignKey(target, ondelete="CASCADE")


def baseline_metadata() -> sa.MetaData:
    """The 0001 tables on a fresh MetaData (times are naive UTC ``DateTime``, dicts are ``JSON``)."""
    meta = sa.MetaData()
    sa.Table(
        "persons", meta,
        sa.Column("id", sa.String(ID_LEN), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, index=True),
        sa.Column("external_id", sa.String(100), unique=True),
        sa.Column("consent", sa.Boolean, nullable=False),
        sa.Column("consent_at", sa.DateTime),
        sa.Column("created_by", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
    )
    sa.Table(
        "chips", meta,
        sa.Column("id", sa.String(ID_LEN), primary_key=True),
        sa.Column("person_id", sa.String(ID_LEN), _fk("persons.id"), nullable=False, index=True),
        sa.Column("ciphertext", sa.LargeBinary, nullable=False),
        sa.Column("key_id", sa.String(16), nullable=False),
        sa.Column("width", sa.Integer, nullable=False),
        sa.Column("height", sa.Integer, nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    sa.Table(
        "templates", meta,
        sa.Column("id", sa.String(ID_LEN), primary_key=True),
        sa.Column("person_id", sa.String(ID_LEN), _fk("persons.id"), nullable=False, index=True),
        sa.Column("chip_id", sa.String(ID_LEN), _fk("chips.id"), index=True),
        sa.Column("model_sha256", sa.String(SHA256_HEX_LEN), nullable=False, index=True),
        sa.Column("ciphertext", sa.LargeBinary, nullable=False),
        sa.Column("key_id", sa.String(16), nullable=False),
        sa.Column("dim", sa.Integer, nullable=False),
        sa.Column("quality", sa.JSON, nullable=False),
        sa.Column("consistency", sa.Float),
        sa.Column("flagged", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.UniqueConstraint("chip_id", "model_sha256", name="uq_template_chip_model"),
    )
    sa.Table(
        "users", meta,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("username", sa.String(64), nullable=False, unique=True),
        sa.Column("password_hash", sa.String(255), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("disabled", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    sa.Table(
        "api_tokens", meta,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("user_id", sa.Integer, _fk("users.id"), nullable=False, index=True),
        sa.Column("token_hash", sa.String(SHA256_HEX_LEN), nullable=False, unique=True),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("expires_at", sa.DateTime),
        sa.Column("revoked", sa.Boolean, nullable=False),
    )
    sa.Table(
        "events", meta,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("event_id", sa.String(64), nullable=False, unique=True),
        sa.Column("device_id", sa.String(DEVICE_ID_LEN), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False, index=True),
        sa.Column("person_id", sa.String(64)),
        sa.Column("person_name", sa.String(200)),
        sa.Column("score", sa.Float),
        sa.Column("margin", sa.Float),
        sa.Column("liveness", sa.String(16)),
        sa.Column("ts", sa.DateTime, nullable=False, index=True),
        sa.Column("received_at", sa.DateTime, nullable=False),
        sa.Column("payload", sa.JSON, nullable=False),
        sa.Index("ix_events_device_ts", "device_id", "ts"),
        sa.Index("ix_events_person_ts", "person_id", "ts"),
    )
    sa.Table(
        "devices", meta,
        sa.Column("device_id", sa.String(DEVICE_ID_LEN), primary_key=True),
        sa.Column("available", sa.String(8), nullable=False),
        sa.Column("available_at", sa.DateTime),
        sa.Column("last_seen", sa.DateTime),
        sa.Column("status", sa.JSON, nullable=False),
        sa.Column("software_version", sa.String(64)),
        sa.Column("model_version", sa.String(128)),
        sa.Column("gallery_version", sa.String(128)),
        sa.Column("bundle_sequence", sa.Integer),
        sa.Column("delta_sequence", sa.Integer),
    )
    sa.Table(
        "bundle_acks", meta,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(DEVICE_ID_LEN), nullable=False, index=True),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("sequence", sa.Integer, nullable=False, index=True),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("percent", sa.Float),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("at", sa.DateTime, nullable=False),
        sa.UniqueConstraint("device_id", "kind", "sequence", name="uq_ack_device_kind_sequence"),
    )
    sa.Table(
        "audit_log", meta,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.DateTime, nullable=False, index=True),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("action", sa.String(32), nullable=False, index=True),
        sa.Column("person_id", sa.String(ID_LEN), index=True),
        sa.Column("subject", sa.String(200)),
        sa.Column("consent", sa.Boolean),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("data", sa.JSON, nullable=False),
    )
    sa.Table(
        "deletion_requests", meta,
        sa.Column("id", sa.String(ID_LEN), primary_key=True),
        sa.Column("person_id", sa.String(ID_LEN), nullable=False, index=True),
        sa.Column("requested_by", sa.String(64), nullable=False),
        sa.Column("requested_at", sa.DateTime, nullable=False),
        sa.Column("template_ids", sa.JSON, nullable=False),
        sa.Column("delta_sequence", sa.Integer, index=True),
        sa.Column("status", sa.String(16), nullable=False, index=True),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("confirmed_at", sa.DateTime),
    )
    sa.Table(
        "deletion_devices", meta,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String(ID_LEN), _fk("deletion_requests.id"), nullable=False),
        sa.Column("device_id", sa.String(DEVICE_ID_LEN), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("acked_at", sa.DateTime),
        sa.Column("detail", sa.Text, nullable=False),
        sa.UniqueConstraint("request_id", "device_id", name="uq_deletion_device"),
    )
    sa.Table(
        "model_versions", meta,
        sa.Column("id", sa.String(ID_LEN), primary_key=True),
        sa.Column("version", sa.String(VERSION_LEN), nullable=False, unique=True, index=True),
        sa.Column("kind", sa.String(32), nullable=False, index=True),
        sa.Column("number", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False, index=True),
        sa.Column("parent_version", sa.String(VERSION_LEN)),
        sa.Column("replaces_version", sa.String(VERSION_LEN)),
        sa.Column("data_hash", sa.String(64), nullable=False),
        sa.Column("hyperparams", sa.JSON, nullable=False),
        sa.Column("metrics", sa.JSON, nullable=False),
        sa.Column("artifacts", sa.JSON, nullable=False),
        sa.Column("note", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("promoted_at", sa.DateTime),
    )
    sa.Table(
        "model_registry_events", meta,
        sa.Column("id", sa.String(ID_LEN), primary_key=True),
        sa.Column("version_id", sa.String(ID_LEN), _fk("model_versions.id"), nullable=False, index=True),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("detail", sa.JSON, nullable=False),
        sa.Column("at", sa.DateTime, nullable=False),
    )
    return meta


def upgrade() -> None:
    """Create every baseline table, index and constraint (what ``create_all`` emitted)."""
    baseline_metadata().create_all(op.get_bind())


def downgrade() -> None:
    """Drop every baseline table."""
    baseline_metadata().drop_all(op.get_bind())
