"""Reading uploaded images within the configured limits, and turning enrollment results into responses.

Only the bytes are used: the client's filename is echoed back for display and never becomes a path.
"""

from __future__ import annotations

from fastapi import HTTPException, UploadFile, status

from server.api.schemas import DuplicateOut, EnrollResponse, GateFailureOut, ImageResult, PersonOut
from server.config import UploadConfig
from server.db.models import Person
from server.enrollment.service import EnrollmentResult, ImageOutcome, Outcome, UploadedImage

READ_CHUNK = 1 << 16


async def read_upload(upload: UploadFile, limits: UploadConfig) -> UploadedImage:
    """Read at most ``max_bytes + 1`` bytes; mark the image too large instead of reading more."""
    chunks: list[bytes] = []
    size = 0
    while size <= limits.max_bytes:
        chunk = await upload.read(min(READ_CHUNK, limits.max_bytes + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    too_large = size > limits.max_bytes
    return UploadedImage(data=b"" if too_large else b"".join(chunks), filename=upload.filename,
                         too_large=too_large)


async def read_uploads(files: list[UploadFile], limits: UploadConfig) -> list[UploadedImage]:
    """All uploads of a request (400 when none, 413 when too many)."""
    if not files:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "no image was uploaded (form field 'images')")
    if len(files) > limits.max_files:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE,
                            f"{len(files)} images sent; at most {limits.max_files} per request")
    return [await read_upload(f, limits) for f in files]


def image_result(outcome: ImageOutcome) -> ImageResult:
    """API form of one image's verdict."""
    return ImageResult(
        index=outcome.index,
        filename=outcome.filename,
        accepted=outcome.outcome is Outcome.ACCEPTED,
        status=outcome.outcome.value,
        error=outcome.error,
        failures=[GateFailureOut(gate=f.gate, measured=f.measured, limit=f.limit, message=f.message)
                  for f in outcome.failures],
        duplicate=DuplicateOut(person_id=outcome.duplicate.person_id, name=outcome.duplicate.name,
                               score=outcome.duplicate.score) if outcome.duplicate else None,
        template_id=outcome.template_id,
        consistency=outcome.consistency,
        flagged=outcome.flagged,
        quality=outcome.quality,
    )


def person_out(person: Person) -> PersonOut:
    """API form of a person with template counts."""
    return PersonOut(
        id=person.id, name=person.name, external_id=person.external_id, consent=person.consent,
        consent_at=person.consent_at, created_by=person.created_by, created_at=person.created_at,
        updated_at=person.updated_at, templates=len(person.templates),
        flagged_templates=sum(1 for t in person.templates if t.flagged),
    )


def failure_status(result: EnrollmentResult) -> int:
    """HTTP status of an enrollment with no accepted image: the first image's failure decides."""
    first = result.images[0]
    if first.outcome is Outcome.DUPLICATE:
        return status.HTTP_409_CONFLICT
    if first.outcome is Outcome.REJECTED:
        return status.HTTP_422_UNPROCESSABLE_CONTENT
    if first.error_code == "too_large":
        return status.HTTP_413_CONTENT_TOO_LARGE
    if first.error_code == "unsupported_format":
        return status.HTTP_415_UNSUPPORTED_MEDIA_TYPE
    return status.HTTP_400_BAD_REQUEST


def enroll_response(result: EnrollmentResult) -> EnrollResponse:
    """API form of an enrollment result."""
    results = [image_result(o) for o in result.images]
    accepted = sum(1 for r in results if r.accepted)
    return EnrollResponse(
        person=person_out(result.person) if result.person is not None else None,
        accepted=accepted,
        rejected=len(results) - accepted,
        results=results,
        gallery_sequence=result.gallery_sequence,
    )
