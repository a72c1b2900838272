"""1:1 verify (claimed person + image -> decision and score) and 1:N identify (image -> top-k)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, HTTPException, UploadFile, status
from starlette.concurrency import run_in_threadpool

from core.types import FloatArray
from models.face.image import ImageError, decode_image
from server.api.deps import LimitedAdminDep, SessionDep, StateDep
from server.api.schemas import Candidate, IdentifyResponse, VerifyResponse
from server.api.uploads import read_upload
from server.db.models import Person
from server.enrollment.recognition import EngineUnavailableError, QualityRejectedError
from server.state import AppState

router = APIRouter(prefix="/api", tags=["recognition"])

IMAGE_ERROR_STATUS = {
    "too_large": status.HTTP_413_CONTENT_TOO_LARGE,
    "unsupported_format": status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
}
RESPONSES: dict[int | str, dict[str, str]] = {
    400: {"description": "not a usable image"},
    413: {"description": "image too large (bytes or pixels)"},
    415: {"description": "not a JPEG or PNG"},
    422: {"description": "zero or several faces"},
    429: {"description": "rate limited"},
}


async def _probe(state: AppState, image: UploadFile) -> tuple[FloatArray, str]:
    """(embedding, model sha256) of the single face in an upload, or the matching 4xx/503."""
    upload = await read_upload(image, state.config.upload)
    limits = state.config.upload
    if upload.too_large:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE,
                            f"image file is larger than the limit of {limits.max_bytes} bytes")
    try:
        rgb = decode_image(upload.data, max_bytes=limits.max_bytes, max_pixels=limits.max_pixels)
        vector = await run_in_threadpool(state.engine.probe, rgb)
        model = state.engine.model_sha256
    except ImageError as exc:
        raise HTTPException(IMAGE_ERROR_STATUS.get(exc.code.value, status.HTTP_400_BAD_REQUEST), str(exc)) \
            from exc
    except QualityRejectedError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from exc
    except EngineUnavailableError as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from exc
    return vector, model


@router.post("/verify", response_model=VerifyResponse, summary="1:1: is this image the claimed person?",
             responses=RESPONSES)
async def verify(
    _: LimitedAdminDep, state: StateDep, session: SessionDep,
    person_id: Annotated[str, Form(min_length=1, max_length=64)],
    image: Annotated[UploadFile, File(description="JPEG/PNG with exactly one face")],
) -> VerifyResponse:
    """Best cosine between the probe and the person's templates, and whether it reaches tau."""
    if session.get(Person, person_id) is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"person {person_id} not found")
    vector, model = await _probe(state, image)
    scores = state.index.person_scores(session, model, person_id, vector)
    if not scores:
        raise HTTPException(status.HTTP_409_CONFLICT,
                            f"person {person_id} has no template for the current model {model[:12]}")
    best, tau = max(scores), state.config.recognition.tau
    return VerifyResponse(person_id=person_id, match=best >= tau, score=best, tau=tau, model_sha256=model)


@router.post("/identify", response_model=IdentifyResponse, summary="1:N: who is this?", responses=RESPONSES)
async def identify(
    _: LimitedAdminDep, state: StateDep, session: SessionDep,
    image: Annotated[UploadFile, File(description="JPEG/PNG with exactly one face")],
    top_k: Annotated[int | None, Form(ge=1, le=100)] = None,
) -> IdentifyResponse:
    """The top-k persons by best template score; ``match`` when the best reaches tau."""
    vector, model = await _probe(state, image)
    k = top_k or state.config.recognition.top_k
    hits = state.index.search(session, model, vector, k)
    tau = state.config.recognition.tau
    return IdentifyResponse(
        match=bool(hits) and hits[0].score >= tau, tau=tau, model_sha256=model,
        candidates=[Candidate(person_id=h.person_id, name=h.name, score=h.score) for h in hits],
    )
