"""Turn device messages into rows: events inserted idempotently by event id, devices upserted with
availability, status and versions, bundle and gallery-delta acks recorded per sequence.

Parsing uses the wire schemas of :mod:`core.protocol.schemas`; the device id always comes from the
topic (broker ACLs bind a device to its own topics) and a payload naming another device is refused.
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from core.protocol.schemas import BundleAck, EventPayload, PayloadError, StatusPayload
from core.protocol.topics import Topics
from core.types import FACE_KINDS
from server.db.models import BundleAckRow, Device, EventRow, utcnow

logger = logging.getLogger(__name__)

AVAILABILITY_VALUES = frozenset({"online", "offline"})
BUNDLE_KIND, DELTA_KIND = "bundle", "delta"
# In Device.status: the door's time of the last report stored (its status, or an ack), never later than
# the server's receipt time, so a door whose clock once ran ahead is not ignored after it is corrected.
REPORTED_AT = "reported_at"
INSERT_CHUNK = 400  # rows per INSERT statement (SQLite allows 32766 bound parameters; 12 columns each)


class MessageKind(enum.StrEnum):
    """Which device topic a message came from."""

    EVENT = "event"
    AVAILABLE = "available"
    STATUS = "status"
    BUNDLE_ACK = "bundle_ack"


class InvalidMessageError(ValueError):
    """A message on a device topic does not parse or names the wrong device."""


@dataclass(frozen=True, slots=True)
class Parsed:
    """A validated message and the device it came from."""

    kind: MessageKind
    device_id: str
    received_at: dt.datetime
    body: EventPayload | StatusPayload | BundleAck | str


def classify(topics: Topics, topic: str) -> tuple[MessageKind, str] | None:
    """(kind, device id) of a per-device topic this subscriber stores, or None."""
    device_id = Topics.device_of(topic)
    if device_id is None:
        return None
    builders = (
        (MessageKind.EVENT, topics.events),
        (MessageKind.AVAILABLE, topics.available),
        (MessageKind.STATUS, topics.status),
        (MessageKind.BUNDLE_ACK, topics.bundle_ack),
    )
    for kind, builder in builders:
        try:
            if builder(device_id) == topic:
                return kind, device_id
        except ValueError:
            return None
    return None


def parse(topics: Topics, topic: str, payload: bytes,
          received_at: dt.datetime | None = None) -> Parsed | None:
    """Validate one message; None for topics not stored here; InvalidMessageError for bad payloads."""
    found = classify(topics, topic)
    if found is None:
        return None
    kind, device_id = found
    now = received_at or utcnow()
    try:
        if kind is MessageKind.AVAILABLE:
            text = payload.decode("utf-8", errors="replace").strip().lower()
            if text not in AVAILABILITY_VALUES:
                raise InvalidMessageError(f"availability must be online/offline, got {text[:16]!r}")
            return Parsed(kind, device_id, now, text)
        body: EventPayload | StatusPayload | BundleAck
        if kind is MessageKind.EVENT:
            body = EventPayload.parse(payload)
        elif kind is MessageKind.STATUS:
            body = StatusPayload.parse(payload)
        else:
            body = BundleAck.parse(payload)
    except PayloadError as exc:
        raise InvalidMessageError(str(exc)) from exc
    if body.device != device_id:
        raise InvalidMessageError(f"payload names device {body.device!r} but came on {device_id!r}'s topic")
    return Parsed(kind, device_id, now, body)


@dataclass(slots=True)
class BatchResult:
    """What one batch changed."""

    inserted: int = 0
    duplicates: int = 0
    kinds: dict[str, int] = field(default_factory=dict)  # inserted events per decision kind
    delta_devices: set[str] = field(default_factory=set)
    bundle_devices: set[str] = field(default_factory=set)  # devices whose running bundle changed
    stored_seqs: dict[str, list[int]] = field(default_factory=dict)  # device -> event seqs now on record

    def merge(self, other: BatchResult) -> None:
        """Add another result (one message stored on its own) to this one."""
        self.inserted += other.inserted
        self.duplicates += other.duplicates
        for kind, count in other.kinds.items():
            self.kinds[kind] = self.kinds.get(kind, 0) + count
        self.delta_devices |= other.delta_devices
        self.bundle_devices |= other.bundle_devices
        for device, seqs in other.stored_seqs.items():
            self.stored_seqs.setdefault(device, []).extend(seqs)


def _event_row(parsed: Parsed) -> dict[str, Any]:
    ev = parsed.body
    if not isinstance(ev, EventPayload):
        raise TypeError("not an event")
    face = ev.decision in FACE_KINDS
    return {
        "event_id": str(ev.event_id),
        "device_id": parsed.device_id,
        "kind": ev.decision.value,
        "person_id": ev.person_id,
        "person_name": ev.name,
        # manual unlocks and door faults come from no face: no score, margin or liveness to show
        "score": ev.score if face else None,
        "margin": ev.margin if face else None,
        "liveness": ev.liveness.verdict.value if face else None,
        "ts": ev.ts,
        "received_at": parsed.received_at,
        "payload": ev.model_dump(mode="json"),
    }


def insert_events(session: Session, rows: list[dict[str, Any]]) -> tuple[dict[str, int], int]:
    """Insert events whose id is new; return (inserted per kind, duplicates). Safe with concurrent writers."""
    unique: dict[str, dict[str, Any]] = {}
    for row in rows:
        unique.setdefault(row["event_id"], row)
    fresh = list(unique.values())
    # ON CONFLICT DO NOTHING skips an id already stored (also by another writer, a replica, at the same
    # time); RETURNING says which rows this transaction really inserted, so no event is counted twice.
    stmt = _insert(session)(EventRow).on_conflict_do_nothing(index_elements=["event_id"])
    inserted: set[str] = set()
    for start in range(0, len(fresh), INSERT_CHUNK):
        row_chunk = fresh[start : start + INSERT_CHUNK]
        inserted.update(session.scalars(stmt.returning(EventRow.event_id), row_chunk))
    kinds: dict[str, int] = {}
    for row in fresh:
        if row["event_id"] in inserted:
            kinds[row["kind"]] = kinds.get(row["kind"], 0) + 1
    return kinds, len(rows) - len(inserted)


def _insert(session: Session) -> Any:
    """The dialect's INSERT (both have ON CONFLICT DO NOTHING and RETURNING)."""
    return postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert


def lock_devices(session: Session, device_ids: set[str]) -> dict[str, Device]:
    """Create the devices not on record yet and lock all their rows, in id order.

    Replicas store batches concurrently: creating with ON CONFLICT DO NOTHING means two of them never
    collide on a new door, and locking in one global order (``SELECT … FOR UPDATE``, PostgreSQL; SQLite
    has one writer anyway) means two batches touching the same doors wait for each other instead of
    deadlocking, and each reads the rows the other committed.
    """
    ids = sorted(device_ids)
    if not ids:
        return {}
    fresh = [{"device_id": d, "available": "unknown", "status": {}} for d in ids]
    stmt = _insert(session)(Device).on_conflict_do_nothing(index_elements=["device_id"])
    for device_id in session.scalars(stmt.returning(Device.device_id), fresh):
        logger.info("new device %s registered", device_id)
    rows = session.scalars(select(Device).where(Device.device_id.in_(ids)).order_by(Device.device_id)
                           .with_for_update().execution_options(populate_existing=True))
    return {row.device_id: row for row in rows}


def _seen(device: Device, at: dt.datetime) -> None:
    if device.last_seen is None or at > device.last_seen:
        device.last_seen = at


def _record_ack(session: Session, device_id: str, kind: str, sequence: int, state: str,
                percent: float | None, detail: str, at: dt.datetime) -> None:
    row = session.scalar(select(BundleAckRow).where(
        BundleAckRow.device_id == device_id, BundleAckRow.kind == kind, BundleAckRow.sequence == sequence))
    if row is None:
        session.add(BundleAckRow(device_id=device_id, kind=kind, sequence=sequence, state=state,
                                 percent=percent, detail=detail, at=at))
    elif row.at <= at:  # replicas may store a door's acks out of order: never step back
        row.state, row.percent, row.detail, row.at = state, percent, detail, at


def _reported(ts: dt.datetime, received_at: dt.datetime) -> str:
    return min(ts, received_at).isoformat()


def _newest(device: Device, ts: dt.datetime) -> bool:
    """True when ``ts`` is not older than the device's last recorded report (status or ack)."""
    seen = device.status.get(REPORTED_AT) if isinstance(device.status, dict) else None
    if not isinstance(seen, str):
        return True
    try:
        return ts >= dt.datetime.fromisoformat(seen)
    except ValueError:
        return True


def _running(result: BatchResult, device: Device, sequence: int | None) -> None:
    """Record the bundle a device runs, noting a change (delta rebasing re-checks the fleet then)."""
    if device.bundle_sequence != sequence:
        result.bundle_devices.add(device.device_id)
    device.bundle_sequence = sequence


def apply_batch(session: Session, messages: list[Parsed]) -> BatchResult:
    """Write one batch of parsed messages in the caller's transaction."""
    result = BatchResult()
    rows = [_event_row(m) for m in messages if m.kind is MessageKind.EVENT]
    if rows:
        result.kinds, result.duplicates = insert_events(session, rows)
        result.inserted = sum(result.kinds.values())
    for msg in messages:  # inserted now or already on record: either way the door may let it go
        if msg.kind is MessageKind.EVENT and isinstance(msg.body, EventPayload):
            result.stored_seqs.setdefault(msg.device_id, []).append(msg.body.seq)
    devices = lock_devices(session, {m.device_id for m in messages})
    for msg in messages:
        device = devices[msg.device_id]
        body = msg.body
        if isinstance(body, str):  # availability
            device.available, device.available_at = body, msg.received_at
            if body == "online":
                _seen(device, msg.received_at)
            continue
        _seen(device, msg.received_at)
        if isinstance(body, StatusPayload):
            if not _newest(device, body.ts):  # an older report stored after a newer one (replicas)
                continue
            device.status = body.model_dump(mode="json", exclude={"versions", "schema_version", "device"})
            device.status[REPORTED_AT] = _reported(body.ts, msg.received_at)
            device.software_version = body.versions.software or None
            device.model_version = body.versions.model or None
            device.gallery_version = body.versions.gallery or None
            _running(result, device, body.versions.bundle_sequence)
            device.delta_sequence = body.versions.delta_sequence
        elif isinstance(body, BundleAck):
            when = min(body.ts, msg.received_at)  # a door clock running ahead cannot pin a state
            if body.sequence > 0:
                _record_ack(session, msg.device_id, BUNDLE_KIND, body.sequence, body.state, body.percent,
                            body.reason or "", when)
            if body.delta_sequence > 0 and body.delta_state is not None:
                _record_ack(session, msg.device_id, DELTA_KIND, body.delta_sequence, body.delta_state, None,
                            body.delta_reason or "", when)
                result.delta_devices.add(msg.device_id)
            if body.running_sequence is not None and _newest(device, body.ts):
                _running(result, device, body.running_sequence)
                device.status = {**(device.status or {}), REPORTED_AT: _reported(body.ts, msg.received_at)}
    return result
