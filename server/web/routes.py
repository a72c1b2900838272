"""The admin enrollment station: server-rendered pages (Jinja2) plus small vanilla scripts.

Logging in stores the bearer token in an HttpOnly, SameSite=Strict session cookie; the pages' scripts
call the same JSON API with that cookie. Pages redirect to /login when there is no valid session.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Form, HTTPException, Request, status
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from server.api.auth import login_or_raise
from server.api.deps import SESSION_COOKIE, SessionDep, StateDep, same_origin
from server.api.events import EVENT_KINDS, device_out, event_detail, event_query, rollout_state
from server.api.schemas import LoginRequest
from server.api.uploads import person_out
from server.auth.service import Principal, resolve_token, revoke_token
from server.db.models import AuditEntry, Chip, DeletionRequest, Device, EventRow, Person, Template

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))

PAGE_ROWS = 100
# Quality figures shown per template, in this order, with their labels (from the enrollment gates).
QUALITY_FIGURES = (("face_px", "face px"), ("sharpness", "sharpness"), ("yaw_deg", "yaw °"),
                   ("pitch_deg", "pitch °"), ("eye_aspect_ratio", "eyes open"))


def _who(request: Request, session: SessionDep) -> Principal | None:
    token = request.cookies.get(SESSION_COOKIE)
    return resolve_token(session, token) if token else None


def _to_login() -> RedirectResponse:
    return RedirectResponse("/login", status_code=status.HTTP_303_SEE_OTHER)


def _page(request: Request, name: str, who: Principal | None, **context: object) -> HTMLResponse:
    values = {"who": who, "page": name.removesuffix(".html"), **context}
    return templates.TemplateResponse(request, name, values)


def _forbidden(request: Request, who: Principal) -> HTMLResponse:
    response = _page(request, "forbidden.html", who)
    response.status_code = status.HTTP_403_FORBIDDEN
    return response


@router.get("/", response_model=None)
def home(request: Request, session: SessionDep) -> Response:
    """Admins land on persons, viewers on events."""
    who = _who(request, session)
    if who is None:
        return _to_login()
    return RedirectResponse("/persons" if who.is_admin else "/events", status_code=status.HTTP_303_SEE_OTHER)


@router.get("/login", response_model=None)
def login_page(request: Request) -> HTMLResponse:
    """The login form."""
    return _page(request, "login.html", None, error=None)


@router.post("/login", response_model=None)
def login_submit(
    request: Request, state: StateDep, session: SessionDep,
    username: Annotated[str, Form()] = "", password: Annotated[str, Form()] = "",
) -> Response:
    """Check the password, set the session cookie and go to the home page."""
    error = None
    if not same_origin(request):
        error = "cross-origin login refused"
    else:
        try:
            body = LoginRequest(username=username, password=password)
            client = request.client.host if request.client else "unknown"
            token = login_or_raise(state, session, body, client)
        except ValidationError:
            error = "enter a username and a password"
        except HTTPException as exc:
            error = str(exc.detail)
    if error is not None:
        response = _page(request, "login.html", None, error=error)
        response.status_code = status.HTTP_401_UNAUTHORIZED
        return response
    redirect = RedirectResponse("/", status_code=status.HTTP_303_SEE_OTHER)
    redirect.set_cookie(SESSION_COOKIE, token.access_token, max_age=state.config.auth.token_ttl_s,
                        httponly=True, samesite="strict", secure=state.config.http.secure_cookies, path="/")
    return redirect


@router.post("/logout", response_model=None)
def logout(request: Request, session: SessionDep) -> Response:
    """Revoke the session token and clear the cookie."""
    who = _who(request, session)
    if who is not None and same_origin(request):
        revoke_token(session, who.token_id)
        session.commit()
    response = _to_login()
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


@router.get("/persons", response_model=None)
def persons_page(request: Request, session: SessionDep, q: str = "") -> Response:
    """Persons with search and delete."""
    who = _who(request, session)
    if who is None:
        return _to_login()
    if not who.is_admin:
        return _forbidden(request, who)
    query = select(Person).options(selectinload(Person.templates)).order_by(Person.name).limit(PAGE_ROWS * 5)
    if q:
        query = query.where(Person.name.ilike(f"%{q[:200]}%"))
    persons = [person_out(p) for p in session.scalars(query)]
    # Whose face can be shown (the image itself is fetched, decrypted and audited per view).
    with_face = set(session.scalars(select(Chip.person_id).where(Chip.person_id.in_([p.id for p in persons]))
                                    .distinct()))
    pending = session.scalars(select(DeletionRequest).where(DeletionRequest.status == "pending")
                              .options(selectinload(DeletionRequest.devices))
                              .order_by(DeletionRequest.requested_at.desc()).limit(PAGE_ROWS)).all()
    return _page(request, "persons.html", who, persons=persons, q=q, pending=pending, with_face=with_face)


@router.get("/persons/{person_id}", response_model=None)
def person_page(request: Request, session: SessionDep, person_id: str) -> Response:
    """One person: their stored faces, each with its templates' quality figures and flags."""
    who = _who(request, session)
    if who is None:
        return _to_login()
    if not who.is_admin:
        return _forbidden(request, who)
    person = session.get(Person, person_id[:64])
    if person is None:
        response = _page(request, "notfound.html", who, what=f"person {person_id[:64]}")
        response.status_code = status.HTTP_404_NOT_FOUND
        return response
    chips = session.scalars(select(Chip).where(Chip.person_id == person.id)
                            .order_by(Chip.created_at, Chip.id)).all()
    templates = session.scalars(select(Template).where(Template.person_id == person.id)
                                .order_by(Template.created_at, Template.id)).all()
    by_chip: dict[str | None, list[Template]] = {}
    for template in templates:
        by_chip.setdefault(template.chip_id, []).append(template)
    return _page(request, "person.html", who, person=person_out(person), chips=chips, by_chip=by_chip,
                 quality_keys=QUALITY_FIGURES)


@router.get("/enroll", response_model=None)
def enroll_page(request: Request, state: StateDep, session: SessionDep) -> Response:
    """Enrollment by webcam capture or file upload, with per-image quality feedback."""
    who = _who(request, session)
    if who is None:
        return _to_login()
    if not who.is_admin:
        return _forbidden(request, who)
    return _page(request, "enroll.html", who, limits=state.config.upload, quality=state.config.quality)


@router.get("/events", response_model=None)
def events_page(request: Request, session: SessionDep, person_id: str = "", device_id: str = "",
                kind: str = "") -> Response:
    """Filterable, auto-refreshing events."""
    who = _who(request, session)
    if who is None:
        return _to_login()
    kind = kind if kind in EVENT_KINDS else ""
    query = event_query(person_id[:64] or None, device_id[:64] or None, kind or None, None, None)
    rows = session.scalars(query.order_by(EventRow.ts.desc(), EventRow.id.desc()).limit(PAGE_ROWS)).all()
    return _page(request, "events.html", who, events=rows, kinds=EVENT_KINDS,
                 details={r.event_id: event_detail(r.payload or {}) for r in rows},
                 filters={"person_id": person_id[:64], "device_id": device_id[:64], "kind": kind})


@router.get("/devices", response_model=None)
def devices_page(request: Request, session: SessionDep) -> Response:
    """Devices online/offline with versions, last seen and rollout progress."""
    who = _who(request, session)
    if who is None:
        return _to_login()
    devices = [device_out(d) for d in session.scalars(select(Device).order_by(Device.device_id))]
    return _page(request, "devices.html", who, devices=devices, rollout=rollout_state(session))


@router.get("/audit", response_model=None)
def audit_page(request: Request, session: SessionDep) -> Response:
    """The audit log and deletion requests (pending versus confirmed)."""
    who = _who(request, session)
    if who is None:
        return _to_login()
    if not who.is_admin:
        return _forbidden(request, who)
    entries = session.scalars(select(AuditEntry).order_by(AuditEntry.id.desc()).limit(PAGE_ROWS)).all()
    deletions = session.scalars(select(DeletionRequest).options(selectinload(DeletionRequest.devices))
                                .order_by(DeletionRequest.requested_at.desc()).limit(PAGE_ROWS)).all()
    return _page(request, "audit.html", who, entries=entries, deletions=deletions)
