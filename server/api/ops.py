"""Operations endpoints without authentication: ``/healthz`` for orchestrators and ``/metrics`` for
Prometheus. Neither names anyone: only up/down, counts, kinds, route templates and sequence numbers."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response, status
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from server.api.deps import StateDep
from server.metrics import ServerMetrics

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="Liveness and readiness: 200 when the database answers, else 503",
            responses={503: {"description": "the database does not answer"}})
def healthz(state: StateDep) -> JSONResponse:
    """``{"status", "db", "mqtt"}``; ``mqtt`` is null when MQTT is disabled (or not started)."""
    db_ok = state.db.ping()
    source = state.source
    body: dict[str, Any] = {"status": "ok" if db_ok else "unavailable", "db": db_ok,
                            "mqtt": source.connected if source is not None else None}
    code = status.HTTP_200_OK if db_ok else status.HTTP_503_SERVICE_UNAVAILABLE
    return JSONResponse(body, status_code=code)


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    """Prometheus text exposition of this app's registry."""
    server_metrics: ServerMetrics = request.app.state.metrics
    return Response(server_metrics.scrape(), media_type=CONTENT_TYPE_LATEST)
