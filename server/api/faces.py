"""Face images for the enrollment station: a person's thumbnail and each stored chip, decrypted on demand.

Admins only. Every image is decrypted from the database for that one response, sent with
``Cache-Control: no-store`` (the browser keeps no copy) and recorded in the audit log (``face_viewed``:
who saw whose face, which chip). Nothing is written to disk or to the log but the audit entry.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Path, Response, status
from sqlalchemy import select

from server.api.deps import AdminDep, SessionDep, StateDep
from server.audit.log import AuditAction, record
from server.crypto import CryptoError
from server.db.models import Chip, Person
from server.rowbinding import chip_associated

router = APIRouter(prefix="/api", tags=["persons"])

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
IdPath = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[0-9a-f]+$")]


def _image(state: StateDep, session: SessionDep, who: AdminDep, person: Person, chip: Chip,
           view: Literal["thumbnail", "chip"]) -> Response:
    """Decrypt one chip (PNG inside), audit the view, answer uncacheable."""
    try:
        png = state.cipher.decrypt(chip.ciphertext, chip_associated(chip.id, person.id))
    except CryptoError as exc:
        raise HTTPException(status.HTTP_500_INTERNAL_SERVER_ERROR,
                            f"this face cannot be decrypted with the configured chip key: {exc}") from exc
    record(session, who.username, AuditAction.FACE_VIEWED, f"viewed a face of {person.name!r} ({view})",
           person_id=person.id, subject=person.name, data={"chip_id": chip.id, "view": view})
    session.commit()
    return Response(png, media_type="image/png", headers=NO_STORE)


def _person(session: SessionDep, person_id: str) -> Person:
    person = session.get(Person, person_id)
    if person is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"person {person_id} not found")
    return person


@router.get("/persons/{person_id}/thumbnail", response_class=Response, summary="A person's face (first chip)",
            responses={200: {"content": {"image/png": {}}}, 404: {"description": "no person or no face"}})
def person_thumbnail(person_id: IdPath, who: AdminDep, state: StateDep, session: SessionDep) -> Response:
    """The person's first enrolled chip as PNG (audited, never cached)."""
    person = _person(session, person_id)
    chip = session.scalars(select(Chip).where(Chip.person_id == person.id)
                           .order_by(Chip.created_at, Chip.id).limit(1)).first()
    if chip is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"person {person_id} has no stored face")
    return _image(state, session, who, person, chip, "thumbnail")


@router.get("/persons/{person_id}/chips/{chip_id}", response_class=Response, summary="One stored face chip",
            responses={200: {"content": {"image/png": {}}}, 404: {"description": "no such chip"}})
def person_chip(person_id: IdPath, chip_id: IdPath, who: AdminDep, state: StateDep,
                session: SessionDep) -> Response:
    """One aligned 150x150 chip of the person as PNG (audited, never cached)."""
    person = _person(session, person_id)
    chip = session.get(Chip, chip_id)
    if chip is None or chip.person_id != person.id:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"chip {chip_id} of person {person_id} not found")
    return _image(state, session, who, person, chip, "chip")
