"""Persons: list and search, create, read, update, enroll images, delete (with device confirmation)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, Form, HTTPException, Query, Response, UploadFile, status
from sqlalchemy import func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload
from starlette.concurrency import run_in_threadpool

from server.api.deps import AdminDep, LimitedAdminDep, SessionDep, StateDep
from server.api.schemas import (
    DeletionOut,
    EnrollResponse,
    PersonCreate,
    PersonList,
    PersonOut,
    PersonUpdate,
    TemplateOut,
)
from server.api.uploads import enroll_response, failure_status, person_out, read_uploads
from server.audit.log import AuditAction, record
from server.db.models import DeletionRequest, Person, Template, utcnow
from server.enrollment.deletion import DeletionError
from server.enrollment.recognition import EngineUnavailableError
from server.enrollment.service import EnrollmentError, EnrollmentErrorKind, NewPerson, UploadedImage
from server.state import AppState

router = APIRouter(prefix="/api", tags=["persons"])

MAX_PAGE = 500
MAX_WAIT_S = 120.0
ENROLLMENT_ERROR_STATUS = {
    EnrollmentErrorKind.NOT_FOUND: status.HTTP_404_NOT_FOUND,
    EnrollmentErrorKind.NO_CONSENT: status.HTTP_422_UNPROCESSABLE_CONTENT,
    EnrollmentErrorKind.CONFLICT: status.HTTP_409_CONFLICT,
    EnrollmentErrorKind.BAD_REQUEST: status.HTTP_400_BAD_REQUEST,
}


def _get_person(session: SessionDep, person_id: str) -> Person:
    person = session.get(Person, person_id)
    if person is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"person {person_id} not found")
    return person


def deletion_out(req: DeletionRequest) -> DeletionOut:
    """API form of a deletion request."""
    return DeletionOut.model_validate(req, from_attributes=True)


@router.get("/persons", response_model=PersonList, summary="List or search persons")
def list_persons(
    _: AdminDep, session: SessionDep,
    q: Annotated[str | None, Query(max_length=200, description="Substring of name or external id")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> PersonList:
    """Persons ordered by name, optionally filtered by a case-insensitive substring."""
    query = select(Person)
    if q:
        # A literal substring: % and _ in the query match themselves, not any characters.
        literal = q.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        pattern = f"%{literal}%"
        query = query.where(or_(func.lower(Person.name).like(pattern, escape="\\"),
                                func.lower(Person.external_id).like(pattern, escape="\\")))
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(query.options(selectinload(Person.templates))
                           .order_by(Person.name, Person.id).limit(limit).offset(offset)).all()
    return PersonList(total=total, items=[person_out(p) for p in rows])


@router.post("/persons", response_model=PersonOut, status_code=status.HTTP_201_CREATED,
             summary="Create a person (templates come from enrollment)")
def create_person(body: PersonCreate, who: AdminDep, session: SessionDep) -> PersonOut:
    """Create a person record and audit it with the consent flag."""
    person = Person(name=body.name, external_id=body.external_id, consent=body.consent,
                    consent_at=utcnow() if body.consent else None, created_by=who.username)
    session.add(person)
    try:
        session.flush()
    except IntegrityError as exc:
        session.rollback()
        raise HTTPException(status.HTTP_409_CONFLICT, f"external id {body.external_id!r} is already used") \
            from exc
    record(session, who.username, AuditAction.PERSON_CREATED, f"created person {person.name!r}",
           person_id=person.id, subject=person.name, consent=person.consent)
    session.commit()
    return person_out(person)


@router.get("/persons/{person_id}", response_model=PersonOut, summary="One person")
def get_person(person_id: str, _: AdminDep, session: SessionDep) -> PersonOut:
    """A person with template counts."""
    return person_out(_get_person(session, person_id))


@router.patch("/persons/{person_id}", response_model=PersonOut, summary="Update a person")
def update_person(person_id: str, body: PersonUpdate, who: AdminDep, session: SessionDep) -> PersonOut:
    """Change name, external id or consent (withdrawing consent does not delete: use DELETE)."""
    person = _get_person(session, person_id)
    changes = body.model_dump(exclude_unset=True)
    for key, value in changes.items():
        if key == "name" and value is None:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "name cannot be null")
        setattr(person, key, value)
    if changes.get("consent"):
        person.consent_at = utcnow()
    try:
        session.flush()
    except IntegrityError as exc:
        session.rollback()
        raise HTTPException(status.HTTP_409_CONFLICT, "external id is already used") from exc
    record(session, who.username, AuditAction.PERSON_UPDATED,
           f"updated {', '.join(sorted(changes)) or 'nothing'} of {person.name!r}",
           person_id=person.id, subject=person.name, consent=person.consent,
           data={"fields": sorted(changes)})
    session.commit()
    return person_out(person)


@router.get("/persons/{person_id}/templates", response_model=list[TemplateOut],
            summary="Template metadata of a person")
def list_templates(person_id: str, _: AdminDep, session: SessionDep) -> list[TemplateOut]:
    """Model version, quality and the self-consistency flag of each template (never the embedding)."""
    _get_person(session, person_id)
    rows = session.scalars(select(Template).where(Template.person_id == person_id)
                           .order_by(Template.created_at)).all()
    return [TemplateOut.model_validate(t, from_attributes=True) for t in rows]


async def _enroll(state: AppState, session: Session, actor: str, uploads: list[UploadedImage],
                  response: Response, override_duplicate: bool, source: str,
                  **target: Any) -> EnrollResponse:
    """Run an enrollment off the event loop; map its errors to HTTP, a full rejection to 4xx."""
    try:
        result = await run_in_threadpool(state.enrollment.enroll, session, actor, uploads,
                                         override_duplicate=override_duplicate, source=source, **target)
    except EnrollmentError as exc:
        raise HTTPException(ENROLLMENT_ERROR_STATUS[exc.kind], str(exc)) from exc
    except EngineUnavailableError as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from exc
    if result.accepted == 0:
        response.status_code = failure_status(result)
    return enroll_response(result)


@router.post("/persons/{person_id}/images", response_model=EnrollResponse,
             summary="Enroll more images of an existing person",
             responses={409: {"description": "duplicate of another person"},
                        413: {"description": "file or request too large"},
                        422: {"description": "quality gates failed"}})
async def add_images(
    person_id: str, who: LimitedAdminDep, state: StateDep, session: SessionDep, response: Response,
    images: Annotated[list[UploadFile], File(description="1..N JPEG/PNG images, one face each")],
    override_duplicate: Annotated[bool, Form()] = False,
    source: Annotated[str, Form(pattern="^(upload|webcam)$")] = "upload",
) -> EnrollResponse:
    """Run the quality gates, duplicate check and self-consistency on each image; store accepted ones."""
    uploads = await read_uploads(images, state.config.upload)
    return await _enroll(state, session, who.username, uploads, response, override_duplicate, source,
                         person_id=person_id)


@router.post("/enroll", response_model=EnrollResponse, status_code=status.HTTP_201_CREATED,
             summary="Create a person from 1..N images (the web station's upload and webcam capture)",
             responses={409: {"description": "duplicate of another person"},
                        413: {"description": "file or request too large"},
                        422: {"description": "quality gates failed or consent missing"}})
async def enroll(
    who: LimitedAdminDep, state: StateDep, session: SessionDep, response: Response,
    name: Annotated[str, Form(min_length=1, max_length=200)],
    images: Annotated[list[UploadFile], File(description="1..N JPEG/PNG images, one face each")],
    consent: Annotated[bool, Form(description="The person consented to biometric enrollment")] = False,
    external_id: Annotated[str | None, Form(max_length=100)] = None,
    override_duplicate: Annotated[bool, Form()] = False,
    source: Annotated[str, Form(pattern="^(upload|webcam)$")] = "upload",
) -> EnrollResponse:
    """The person is created only when at least one image is accepted."""
    uploads = await read_uploads(images, state.config.upload)
    new = NewPerson(name=name.strip(), external_id=(external_id or "").strip() or None, consent=consent)
    return await _enroll(state, session, who.username, uploads, response, override_duplicate, source,
                         new_person=new)


@router.delete("/persons/{person_id}", response_model=DeletionOut,
               summary="Delete a person: purge now, then wait for the doors to confirm",
               responses={200: {"description": "confirmed by every device"},
                          202: {"description": "purged here; some devices have not confirmed yet"}})
def delete_person(
    person_id: str, who: AdminDep, state: StateDep, session: SessionDep, response: Response,
    wait_s: Annotated[float | None, Query(ge=0, le=MAX_WAIT_S,
                                          description="Seconds to wait for device acks")] = None,
) -> DeletionOut:
    """Purge chips and embeddings, publish a gallery removal and wait for acks (200) or not (202)."""
    try:
        req = state.deletions.request(session, who.username, person_id)
    except DeletionError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc
    timeout = state.config.mqtt.deletion_ack_timeout_s if wait_s is None else wait_s
    latest = state.deletions.wait(req.id, timeout) or req
    response.status_code = status.HTTP_200_OK if latest.status == "confirmed" else status.HTTP_202_ACCEPTED
    return deletion_out(latest)


@router.get("/deletions", response_model=list[DeletionOut], summary="Deletion requests, newest first")
def list_deletions(
    _: AdminDep, session: SessionDep,
    pending: Annotated[bool | None, Query(description="Only pending (true) or confirmed (false)")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
) -> list[DeletionOut]:
    """Pending versus confirmed deletions with each device's state."""
    query = select(DeletionRequest).options(selectinload(DeletionRequest.devices))
    if pending is not None:
        query = query.where(DeletionRequest.status == ("pending" if pending else "confirmed"))
    rows = session.scalars(query.order_by(DeletionRequest.requested_at.desc()).limit(limit)).all()
    return [deletion_out(r) for r in rows]


@router.get("/deletions/{deletion_id}", response_model=DeletionOut, summary="One deletion request")
def get_deletion(deletion_id: str, _: AdminDep, session: SessionDep) -> DeletionOut:
    """A deletion request and each device's confirmation."""
    req = session.get(DeletionRequest, deletion_id)
    if req is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"deletion {deletion_id} not found")
    return deletion_out(req)
