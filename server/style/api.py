"""FastAPI routes of the style-transfer service under /style; the server injects auth as a dependency."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, HTTPException, UploadFile, status
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError

from server.style.images import ImageTooLargeError, NotAnImageError, StyleInputError
from server.style.jobs import (
    JobNotFoundError,
    JobNotReadyError,
    JobStatus,
    StyleBusyError,
    StyleJobError,
    StyleJobs,
    StyleParamsError,
)
from server.style.params import StyleParams

# Seconds a client is told to wait when the queue is full (about one 256 px job on 2 cores).
RETRY_AFTER_S = 30


class JobCreated(BaseModel):
    """The answer to a submitted job."""

    id: str
    state: str
    status_url: str
    result_url: str


def _read_limited(upload: UploadFile, limit: int, label: str) -> bytes:
    """Read at most limit+1 bytes, so an oversized upload is refused without holding all of it."""
    data = upload.file.read(limit + 1)
    if len(data) > limit:
        raise ImageTooLargeError(f"{label}: upload exceeds the limit of {limit} bytes")
    return data


def _http_error(exc: Exception) -> HTTPException:
    """Map a domain error to an HTTP status with a clear detail."""
    if isinstance(exc, JobNotFoundError):
        return HTTPException(status.HTTP_404_NOT_FOUND, detail=str(exc.args[0]) if exc.args else "not found")
    if isinstance(exc, JobNotReadyError):
        return HTTPException(status.HTTP_409_CONFLICT, detail={"error": str(exc), "state": exc.state.value})
    if isinstance(exc, StyleBusyError):
        return HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail=str(exc),
                             headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, ImageTooLargeError):
        return HTTPException(status.HTTP_413_CONTENT_TOO_LARGE,
                             detail={"error": str(exc), "reason": exc.reason})
    if isinstance(exc, NotAnImageError):
        return HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
                             detail={"error": str(exc), "reason": exc.reason})
    if isinstance(exc, StyleInputError):
        return HTTPException(status.HTTP_400_BAD_REQUEST, detail={"error": str(exc), "reason": exc.reason})
    if isinstance(exc, StyleParamsError):
        return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc))
    return HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail=str(exc))


def build_router(jobs: StyleJobs, require_role: Callable[..., Any] | None = None) -> APIRouter:
    """The /style router; ``require_role`` (a FastAPI dependency) guards every route when given."""
    dependencies = [Depends(require_role)] if require_role is not None else []
    router = APIRouter(prefix="/style", tags=["style"], dependencies=dependencies)
    limit = jobs.config.max_upload_bytes

    # Plain (sync) handlers: FastAPI runs them on its thread pool, so decoding never blocks the loop.
    @router.post("/jobs", status_code=status.HTTP_202_ACCEPTED, response_model=JobCreated)
    def create_job(
        content: Annotated[UploadFile, File(description="Content image (PNG/JPEG/...).")],
        style: Annotated[UploadFile, File(description="Style image.")],
        params: Annotated[str | None, Form(description="StyleParams as JSON; omitted = defaults.")] = None,
    ) -> JobCreated:
        """Queue a style-transfer job; returns its id at once."""
        try:
            parsed = StyleParams.model_validate_json(params) if params else StyleParams()
        except ValidationError as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                                detail=exc.errors(include_url=False, include_context=False)) from exc
        try:
            content_bytes = _read_limited(content, limit, "content")
            style_bytes = _read_limited(style, limit, "style")
            job_id = jobs.submit(content_bytes, style_bytes, parsed)
        except (StyleInputError, StyleJobError) as exc:
            raise _http_error(exc) from exc
        return JobCreated(id=job_id, state="queued", status_url=f"/style/jobs/{job_id}",
                          result_url=f"/style/jobs/{job_id}/result.png")

    @router.get("/jobs/{job_id}", response_model=JobStatus)
    def get_job(job_id: str) -> JobStatus:
        """State, iteration, losses and ETA of one job."""
        try:
            return jobs.status(job_id)
        except StyleJobError as exc:
            raise _http_error(exc) from exc

    @router.delete("/jobs/{job_id}", response_model=JobStatus, status_code=status.HTTP_202_ACCEPTED)
    def cancel_job(job_id: str) -> JobStatus:
        """Cancel a queued or running job (a running one stops after its current iteration)."""
        try:
            return jobs.cancel(job_id)
        except StyleJobError as exc:
            raise _http_error(exc) from exc

    @router.get("/jobs/{job_id}/result.png", response_class=Response)
    def get_result(job_id: str) -> Response:
        """The generated image (409 until the job is done)."""
        try:
            return Response(jobs.result_png(job_id), media_type="image/png")
        except StyleJobError as exc:
            raise _http_error(exc) from exc

    @router.get("/jobs/{job_id}/strip.png", response_class=Response)
    def get_strip(job_id: str) -> Response:
        """Intermediate images side by side (jobs submitted with strip_every > 0)."""
        try:
            return Response(jobs.strip_png(job_id), media_type="image/png")
        except StyleJobError as exc:
            raise _http_error(exc) from exc

    return router
