"""Request and response bodies of the HTTP API (what /docs shows)."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

NAME_MAX = 200
EXTERNAL_ID_MAX = 100


class ApiModel(BaseModel):
    """Base: unknown request keys are errors; responses are built from attributes."""

    model_config = ConfigDict(extra="forbid", from_attributes=True)


class LoginRequest(ApiModel):
    """Username and password."""

    username: str = Field(..., min_length=1, max_length=64)
    password: str = Field(..., min_length=1, max_length=1024)


class TokenResponse(ApiModel):
    """A bearer token for the Authorization header."""

    access_token: str
    token_type: Literal["bearer"] = "bearer"  # noqa: S105 - the OAuth2 scheme name, not a secret
    expires_at: dt.datetime | None
    role: str
    username: str


class Me(ApiModel):
    """The caller."""

    username: str
    role: str


class PersonCreate(ApiModel):
    """A new person (templates are added by enrollment)."""

    name: str = Field(..., min_length=1, max_length=NAME_MAX)
    external_id: str | None = Field(None, min_length=1, max_length=EXTERNAL_ID_MAX)
    consent: bool = Field(..., description="The person consented to biometric enrollment.")


class PersonUpdate(ApiModel):
    """Fields to change."""

    name: str | None = Field(None, min_length=1, max_length=NAME_MAX)
    external_id: str | None = Field(None, min_length=1, max_length=EXTERNAL_ID_MAX)
    consent: bool | None = None


class PersonOut(ApiModel):
    """A person with template counts."""

    id: str
    name: str
    external_id: str | None
    consent: bool
    consent_at: dt.datetime | None
    created_by: str
    created_at: dt.datetime
    updated_at: dt.datetime
    templates: int = 0
    flagged_templates: int = 0


class PersonList(ApiModel):
    """A page of persons."""

    total: int
    items: list[PersonOut]


class TemplateOut(ApiModel):
    """Template metadata (never the embedding or the chip)."""

    id: str
    chip_id: str | None = Field(None, description="The stored face this template was computed from.")
    model_sha256: str
    dim: int
    quality: dict[str, Any]
    consistency: float | None
    flagged: bool
    created_at: dt.datetime


class GateFailureOut(ApiModel):
    """One failed quality gate: which, the measured value, the limit, and a readable reason."""

    gate: str
    measured: float | None
    limit: float | None
    message: str


class DuplicateOut(ApiModel):
    """The existing person a new face matched."""

    person_id: str
    name: str
    score: float


class ImageResult(ApiModel):
    """What happened to one uploaded image."""

    index: int
    filename: str | None = Field(None, description="As sent by the client; display only, never stored.")
    accepted: bool
    status: Literal["accepted", "rejected", "duplicate", "invalid"]
    error: str | None = None
    failures: list[GateFailureOut] = Field(default_factory=list)
    duplicate: DuplicateOut | None = None
    template_id: str | None = None
    consistency: float | None = None
    flagged: bool = False
    quality: dict[str, float] = Field(default_factory=dict)


class EnrollResponse(ApiModel):
    """Outcome of an enrollment request, image by image."""

    person: PersonOut | None
    accepted: int
    rejected: int
    results: list[ImageResult]
    gallery_sequence: int | None = Field(None, description="Gallery delta published to the doors, if any.")


class VerifyResponse(ApiModel):
    """1:1 verification."""

    person_id: str
    match: bool
    score: float
    tau: float
    model_sha256: str


class Candidate(ApiModel):
    """One identity of a 1:N search."""

    person_id: str
    name: str
    score: float


class IdentifyResponse(ApiModel):
    """1:N identification: top-k identities, best first."""

    match: bool
    tau: float
    model_sha256: str
    candidates: list[Candidate]


class EventOut(ApiModel):
    """A stored device event."""

    event_id: str
    device_id: str
    kind: str
    person_id: str | None
    person_name: str | None
    score: float | None
    margin: float | None
    liveness: str | None
    ts: dt.datetime
    received_at: dt.datetime
    detail: str | None = Field(None, description="manual_unlock: who asked, for how long; else the reason.")


class EventList(ApiModel):
    """A page of events, newest first."""

    total: int
    items: list[EventOut]


class HourlyDoor(ApiModel):
    """One door's decisions per hour."""

    device_id: str
    counts: dict[str, list[int]] = Field(description="Decision kind -> one count per hour, oldest first.")


class HourlyOut(ApiModel):
    """Decisions per hour per door over the last hours (the events page's chart)."""

    hours: list[dt.datetime] = Field(description="Start of each hour (UTC), oldest first.")
    devices: list[HourlyDoor]
    truncated: bool = Field(False, description="More events than the chart counts: only the newest counted.")


class DeviceOut(ApiModel):
    """A door device."""

    device_id: str
    online: bool
    available: str
    available_at: dt.datetime | None
    last_seen: dt.datetime | None
    software_version: str | None
    model_version: str | None
    gallery_version: str | None
    bundle_sequence: int | None
    status: dict[str, Any]


class RolloutDevice(ApiModel):
    """One device's state for one sequence."""

    device_id: str
    state: str
    progress: float | None
    detail: str
    at: dt.datetime


class RolloutOut(ApiModel):
    """Progress of one bundle or gallery-delta sequence across the fleet."""

    sequence: int
    devices: list[RolloutDevice]
    done: int
    failed: int
    in_progress: int
    known_devices: int


class DeletionDeviceOut(ApiModel):
    """One device's confirmation of a deletion."""

    device_id: str
    state: str
    acked_at: dt.datetime | None
    detail: str


class DeletionOut(ApiModel):
    """A deletion request: pending until every expected device confirmed."""

    id: str
    person_id: str
    requested_by: str
    requested_at: dt.datetime
    delta_sequence: int | None
    status: str
    detail: str
    confirmed_at: dt.datetime | None
    devices: list[DeletionDeviceOut]


class AuditOut(ApiModel):
    """An audit-log entry."""

    id: int
    at: dt.datetime
    actor: str
    action: str
    person_id: str | None
    subject: str | None
    consent: bool | None
    detail: str


class AuditList(ApiModel):
    """A page of the audit log, newest first."""

    total: int
    items: list[AuditOut]
