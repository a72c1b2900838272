"""Device events (filter by person, device, kind and time range; JSON or CSV), devices, rollout, audit log."""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse
from sqlalchemy import Select, func, select

from core.types import DecisionKind
from server.api.deps import AdminDep, PrincipalDep, SessionDep, StateDep
from server.api.schemas import (
    AuditList,
    AuditOut,
    DeviceOut,
    EventList,
    EventOut,
    HourlyDoor,
    HourlyOut,
    RolloutDevice,
    RolloutOut,
)
from server.db.models import AuditEntry, BundleAckRow, Device, EventRow, utcnow

router = APIRouter(prefix="/api", tags=["events and devices"])

MAX_PAGE = 1000
CSV_BATCH = 1000
CSV_MAX_ROWS = 1_000_000  # one export; narrow the time range for more
ROLLOUT_SEQUENCES = 5
DONE_STATES = frozenset({"installed"})
FAILED_STATES = frozenset({"rejected", "rolled_back"})
CSV_COLUMNS = ("event_id", "ts", "device_id", "kind", "person_id", "person_name", "score", "margin",
               "liveness", "received_at", "detail")
HOUR = dt.timedelta(hours=1)
MAX_CHART_HOURS = 7 * 24
# The chart counts at most this many events (newest first); a site past it gets truncated = true.
MAX_CHART_EVENTS = 200_000
# Every kind a door reports: face decisions, manual unlocks (with who asked) and door faults.
EVENT_KINDS = tuple(kind.value for kind in DecisionKind)


def event_detail(payload: dict[str, Any]) -> str | None:
    """What a reader needs beyond the columns: who unlocked and for how long, or why (denied, door_fault)."""
    if payload.get("decision") == DecisionKind.MANUAL_UNLOCK.value:
        seconds = payload.get("seconds")
        length = f" for {seconds:g} s" if isinstance(seconds, int | float) else ""
        correlation = payload.get("correlation_id")
        return f"by {payload.get('requested_by') or 'unknown'}{length}" + (f" ({correlation})" if correlation
                                                                            else "")
    reason = payload.get("reason")
    return str(reason) if reason else None


def event_out(row: EventRow) -> EventOut:
    """The API form of a stored event."""
    return EventOut.model_validate(row, from_attributes=True).model_copy(
        update={"detail": event_detail(row.payload or {})})


def event_query(person_id: str | None, device_id: str | None, kind: str | None,
                since: dt.datetime | None, until: dt.datetime | None) -> Select[EventRow]:
    """Events matching every given filter (times are compared in UTC)."""
    query = select(EventRow)
    if person_id:
        query = query.where(EventRow.person_id == person_id)
    if device_id:
        query = query.where(EventRow.device_id == device_id)
    if kind:
        query = query.where(EventRow.kind == kind)
    if since is not None:
        query = query.where(EventRow.ts >= _utc(since))
    if until is not None:
        query = query.where(EventRow.ts < _utc(until))
    return query


def _utc(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value


PersonQ = Annotated[str | None, Query(max_length=64, description="Only this person id")]
DeviceQ = Annotated[str | None, Query(max_length=64, description="Only this device id")]
KindQ = Annotated[str | None, Query(pattern=f"^({'|'.join(EVENT_KINDS)})$", description="Decision kind")]
SinceQ = Annotated[dt.datetime | None, Query(description="From this time (ISO-8601; naive = UTC), inclusive")]
UntilQ = Annotated[dt.datetime | None, Query(description="Until this time, exclusive")]


@router.get("/events", response_model=EventList, summary="Device events, newest first")
def list_events(
    _: PrincipalDep, session: SessionDep, person_id: PersonQ = None, device_id: DeviceQ = None,
    kind: KindQ = None, since: SinceQ = None, until: UntilQ = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100, offset: Annotated[int, Query(ge=0)] = 0,
) -> EventList:
    """Events matching the filters (viewers may read)."""
    query = event_query(person_id, device_id, kind, since, until)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(query.order_by(EventRow.ts.desc(), EventRow.id.desc()).limit(limit).offset(offset))
    return EventList(total=total, items=[event_out(r) for r in rows])


@router.get("/events/hourly", response_model=HourlyOut, summary="Decisions per hour per door")
def hourly_events(
    _: PrincipalDep, session: SessionDep, device_id: DeviceQ = None,
    hours: Annotated[int, Query(ge=1, le=MAX_CHART_HOURS, description="Hours back from now")] = 24,
) -> HourlyOut:
    """Counts by door, decision kind and UTC hour over the last ``hours`` (the current hour included)."""
    end = utcnow().replace(minute=0, second=0, microsecond=0) + HOUR
    start = end - hours * HOUR
    query = select(EventRow.device_id, EventRow.kind, EventRow.ts).where(EventRow.ts >= start,
                                                                          EventRow.ts < end)
    if device_id:
        query = query.where(EventRow.device_id == device_id)
    rows = session.execute(query.order_by(EventRow.ts.desc()).limit(MAX_CHART_EVENTS + 1)).all()
    counts: dict[str, dict[str, list[int]]] = {}
    for device, kind, ts in rows[:MAX_CHART_EVENTS]:
        slot = int((_utc(ts) - start) / HOUR)
        counts.setdefault(device, {}).setdefault(kind, [0] * hours)[slot] += 1
    return HourlyOut(hours=[start + i * HOUR for i in range(hours)],
                     devices=[HourlyDoor(device_id=d, counts=counts[d]) for d in sorted(counts)],
                     truncated=len(rows) > MAX_CHART_EVENTS)


def _csv_rows(state: StateDep, query: Select[EventRow]) -> Iterator[str]:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    yield buffer.getvalue()
    last_id, sent = 0, 0
    with state.db.session() as session:
        while sent < CSV_MAX_ROWS:
            page = query.where(EventRow.id > last_id).order_by(EventRow.id).limit(CSV_BATCH)
            rows = session.scalars(page).all()
            if not rows:
                return
            buffer.seek(0)
            buffer.truncate()
            for row in rows:
                detail = event_detail(row.payload or {})
                writer.writerow([_cell(detail if c == "detail" else getattr(row, c)) for c in CSV_COLUMNS])
            last_id, sent = rows[-1].id, sent + len(rows)
            yield buffer.getvalue()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dt.datetime):
        return value.isoformat()
    text = str(value)
    # Spreadsheets execute cells starting with these; a device-reported name must not become a formula.
    return "'" + text if text[:1] in ("=", "+", "-", "@") and not _is_number(text) else text


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@router.get("/events.csv", summary="Device events as CSV (same filters)", response_class=StreamingResponse,
            responses={200: {"content": {"text/csv": {}}, "description": "CSV, oldest first"}})
def export_events(
    _: PrincipalDep, state: StateDep, person_id: PersonQ = None, device_id: DeviceQ = None,
    kind: KindQ = None, since: SinceQ = None, until: UntilQ = None,
) -> StreamingResponse:
    """Stream matching events as CSV, oldest first."""
    query = event_query(person_id, device_id, kind, since, until)
    return StreamingResponse(_csv_rows(state, query), media_type="text/csv",
                             headers={"Content-Disposition": 'attachment; filename="facegate-events.csv"'})


def device_out(device: Device) -> DeviceOut:
    """API form of a device."""
    return DeviceOut(
        device_id=device.device_id, online=device.available == "online", available=device.available,
        available_at=device.available_at, last_seen=device.last_seen,
        software_version=device.software_version, model_version=device.model_version,
        gallery_version=device.gallery_version, bundle_sequence=device.bundle_sequence,
        status=device.status or {},
    )


@router.get("/devices", response_model=list[DeviceOut], summary="Doors with availability and versions")
def list_devices(_: PrincipalDep, session: SessionDep) -> list[DeviceOut]:
    """Every device that ever reported, by id."""
    return [device_out(d) for d in session.scalars(select(Device).order_by(Device.device_id))]


def rollout_state(session: SessionDep, limit: int = ROLLOUT_SEQUENCES) -> list[RolloutOut]:
    """Per-device state of the latest bundle sequences, newest first."""
    known = session.scalar(select(func.count()).select_from(Device)) or 0
    sequences = session.scalars(
        select(BundleAckRow.sequence).where(BundleAckRow.kind == "bundle").distinct()
        .order_by(BundleAckRow.sequence.desc()).limit(limit)
    ).all()
    out = []
    for seq in sequences:
        acks = session.scalars(select(BundleAckRow).where(BundleAckRow.kind == "bundle",
                                                          BundleAckRow.sequence == seq)
                               .order_by(BundleAckRow.device_id)).all()
        devices = [RolloutDevice(device_id=a.device_id, state=a.state, progress=a.percent, detail=a.detail,
                                 at=a.at) for a in acks]
        done = sum(1 for a in acks if a.state in DONE_STATES)
        failed = sum(1 for a in acks if a.state in FAILED_STATES)
        out.append(RolloutOut(sequence=seq, devices=devices, done=done, failed=failed,
                              in_progress=len(acks) - done - failed, known_devices=known))
    return out


@router.get("/rollout", response_model=list[RolloutOut], summary="Bundle rollout state, newest first")
def get_rollout(
    _: PrincipalDep, session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100)] = ROLLOUT_SEQUENCES,
) -> list[RolloutOut]:
    """For each recent bundle sequence: each device's state and the done/failed/in-progress counts."""
    return rollout_state(session, limit)


@router.get("/audit", response_model=AuditList, summary="The audit log, newest first")
def list_audit(
    _: AdminDep, session: SessionDep,
    person_id: PersonQ = None,
    action: Annotated[str | None, Query(max_length=32)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100, offset: Annotated[int, Query(ge=0)] = 0,
) -> AuditList:
    """Enrollments with consent, deletions with device confirmations, logins that failed."""
    query = select(AuditEntry)
    if person_id:
        query = query.where(AuditEntry.person_id == person_id)
    if action:
        query = query.where(AuditEntry.action == action)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(query.order_by(AuditEntry.id.desc()).limit(limit).offset(offset))
    return AuditList(total=total, items=[AuditOut.model_validate(r, from_attributes=True) for r in rows])
