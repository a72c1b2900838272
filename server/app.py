"""``create_app(config)``: the FastAPI application with the API, the web station and the audit subscriber."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from facegate import __version__
from server.api import auth, doors, events, faces, ops, persons, recognize, users
from server.api.deps import PrincipalDep, require_admin
from server.bodylimit import BodyLimitMiddleware
from server.config import ServerConfig
from server.enrollment.recognition import RecognitionEngine
from server.enrollment.sync import GallerySync
from server.metrics import HttpMetricsMiddleware, ServerMetrics
from server.registry.promotion import PromotionContext, promotion_hooks
from server.state import AppState
from server.web import routes as web_routes

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "web" / "static"
DOCS_ASSETS = "/docs-assets"  # Swagger UI files from the swagger-ui-bundle wheel (no CDN)
FORM_OVERHEAD_BYTES = 1 << 20  # multipart boundaries and text fields on top of the image bytes
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",  # "no-referrer" would make browsers send Origin: null
}
# Sent when secure_cookies is on (the server is behind HTTPS): one year, subdomains included.
HSTS = "max-age=31536000; includeSubDomains"
# The web station loads only its own scripts and styles; camera frames stay in blob: URLs.
PAGE_CSP = ("default-src 'self'; img-src 'self' data: blob:; media-src 'self' blob:; "
            "style-src 'self'; script-src 'self'; frame-ancestors 'none'; form-action 'self'")
# Swagger UI: local scripts, plus the one inline script FastAPI's page uses to start it.
DOCS_CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
            "script-src 'self' 'unsafe-inline'; frame-ancestors 'none'")


def _docs_router() -> APIRouter:
    """OpenAPI schema and Swagger UI, behind authentication like every other route."""
    router = APIRouter(include_in_schema=False)

    @router.get("/openapi.json")
    def openapi(request: Request, _: PrincipalDep) -> JSONResponse:
        return JSONResponse(request.app.openapi())

    @router.get("/docs")
    def docs(_: PrincipalDep) -> HTMLResponse:
        # Swagger UI's scripts come from the swagger-ui-bundle wheel, served locally: /docs works offline.
        return get_swagger_ui_html(openapi_url="/openapi.json", title="facegate API",
                                   swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png")

    return router


def _mount_style(app: FastAPI, state: AppState) -> None:
    """Mount the style-transfer API under /api/style for admins when ``[style]`` is configured."""
    if state.config.style is None:
        return
    from server.style.api import build_router
    from server.style.jobs import StyleJobs

    jobs = StyleJobs(state.config.style)
    state.extra_closers.append(jobs)
    app.include_router(build_router(jobs, require_admin), prefix="/api")


def create_app(config: ServerConfig, *, engine: RecognitionEngine | None = None,
               sync: GallerySync | None = None, start_mqtt: bool = True) -> FastAPI:
    """Build the state (database, key, services) and the app; MQTT starts with the app's lifespan."""
    state = AppState.build(config, engine=engine, sync=sync)
    # Promotions in this process re-embed from this state's chips, bundle, and switch its engine.
    state.promotion_hooks.update(promotion_hooks(PromotionContext.for_state(state)))

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if start_mqtt:
            state.start_mqtt()
        try:
            yield
        finally:
            state.close()

    app = FastAPI(
        title="facegate server", version=__version__, lifespan=lifespan,
        docs_url=None, redoc_url=None, openapi_url=None,
        description="Enrollment station, audit log and fleet API. Every route but /healthz and /metrics "
                    "needs a bearer token from POST /api/auth/login (admin: enroll, delete; viewer: "
                    "events, devices).",
    )
    app.state.facegate = state
    max_body = config.upload.max_files * config.upload.max_bytes + FORM_OVERHEAD_BYTES

    @app.middleware("http")
    async def limits_and_headers(request: Request,
                                 call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        for key, value in SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        if config.http.secure_cookies:  # served over HTTPS: browsers must never fall back to HTTP
            response.headers.setdefault("Strict-Transport-Security", HSTS)
        if response.headers.get("content-type", "").startswith("text/html"):
            csp = DOCS_CSP if request.url.path == "/docs" else PAGE_CSP
            response.headers.setdefault("Content-Security-Policy", csp)
        return response

    # Every request body, chunked included, counted as it arrives: 413 the moment it passes max_body.
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body)
    # Outermost of our middleware: it also times and counts what the limits above refuse.
    app.state.metrics = ServerMetrics(state)
    app.add_middleware(HttpMetricsMiddleware, metrics=app.state.metrics)
    for module in (auth, persons, faces, recognize, events, ops, users, doors):
        app.include_router(module.router)
    app.include_router(_docs_router())
    _mount_style(app, state)
    app.include_router(web_routes.router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    from swagger_ui_bundle import swagger_ui_path

    app.mount(DOCS_ASSETS, StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")
    return app


def app_state(app: Any) -> AppState:
    """The AppState of an app made by :func:`create_app`."""
    state: AppState = app.state.facegate
    return state
