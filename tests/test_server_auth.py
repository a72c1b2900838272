"""Authentication and roles: a walk over EVERY route of the OpenAPI schema proves that no token gives 401
and a viewer token gives 403 on admin routes; plus login, logout, expiry, cookies and rate limits. The
module's server runs once on SQLite and once on the throwaway PostgreSQL (``module_db_url``)."""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from server.api.auth import PUBLIC_ROUTES
from server.app import create_app
from server.db.models import ApiToken, AuditEntry, utcnow
from tests.server_support import ADMIN_PASSWORD, add_viewer, login, make_config, state_of, stored_bytes

# What a viewer may call; every other route of the schema is admin-only and must answer 403 to a viewer.
VIEWER_ROUTES = frozenset({
    ("GET", "/api/events"),
    ("GET", "/api/events.csv"),
    ("GET", "/api/events/hourly"),
    ("GET", "/api/devices"),
    ("GET", "/api/rollout"),
    ("GET", "/api/auth/me"),
    ("POST", "/api/auth/logout"),
})
HTTP_METHODS = ("get", "post", "put", "patch", "delete")


def _style_section() -> dict[str, Any]:
    """Mount the style API too (random SqueezeNet weights) when TensorFlow is installed."""
    if importlib.util.find_spec("tensorflow") is None:
        return {}
    return {"style": {"backbone": "squeezenet", "random_weights": True, "workers": 1}}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, module_db_url: str) -> Iterator[TestClient]:
    tmp: Path = tmp_path_factory.mktemp("auth")
    config = make_config(tmp, module_db_url, rate_limit={"per_minute": 6000, "burst": 1000},
                         **_style_section())
    with TestClient(create_app(config, start_mqtt=False)) as test_client:
        yield test_client


def _routes(client: TestClient, headers: dict[str, str]) -> list[tuple[str, str]]:
    schema = client.get("/openapi.json", headers=headers).json()
    return sorted((method.upper(), path) for path, item in schema["paths"].items()
                  for method in item if method in HTTP_METHODS)


def _call(client: TestClient, method: str, path: str, headers: dict[str, str] | None = None) -> int:
    url = path.replace("{", "").replace("}", "")  # every path parameter becomes its own name: a made-up id
    return int(client.request(method, url, headers=headers or {}).status_code)


def test_every_route_needs_a_token(client: TestClient) -> None:
    routes = _routes(client, login(client))
    assert len(routes) >= 15, routes
    assert ("POST", "/api/enroll") in routes and ("DELETE", "/api/persons/{person_id}") in routes
    for method, path in routes:
        code = _call(client, method, path)
        if (method, path) in PUBLIC_ROUTES:
            assert code != 401, (method, path)
        else:
            assert code == 401, (method, path, code)
    for path in ("/openapi.json", "/docs"):
        assert client.get(path).status_code == 401
    bad = {"Authorization": "Bearer fg_not-a-real-token"}
    assert all(_call(client, m, p, bad) == 401 for m, p in routes if (m, p) not in PUBLIC_ROUTES)


def test_viewer_gets_403_on_every_admin_route(client: TestClient) -> None:
    routes = _routes(client, login(client))
    viewer = add_viewer(client, "walker")
    admin_routes = [r for r in routes if r not in VIEWER_ROUTES and r not in PUBLIC_ROUTES]
    assert ("GET", "/api/persons") in admin_routes and ("POST", "/api/verify") in admin_routes
    if _style_section():
        assert any(path.startswith("/api/style/") for _, path in admin_routes)
    for method, path in admin_routes:
        assert _call(client, method, path, viewer) == 403, (method, path)
    for method, path in VIEWER_ROUTES - {("POST", "/api/auth/logout")}:
        assert _call(client, method, path, viewer) == 200, (method, path)
    assert client.get("/openapi.json", headers=viewer).status_code == 200


def test_login_wrong_password_is_401_and_audited(client: TestClient) -> None:
    response = client.post("/api/auth/login", json={"username": "admin", "password": "wrong-password"})
    assert response.status_code == 401
    assert client.post("/api/auth/login", json={"username": "nobody", "password": "x"}).status_code == 401
    with state_of(client).db.session() as session:
        actions = session.scalars(select(AuditEntry.action)).all()
    assert "login_failed" in actions


def test_logout_revokes_the_token(client: TestClient) -> None:
    headers = login(client)
    assert client.get("/api/auth/me", headers=headers).json() == {"username": "admin", "role": "admin"}
    assert client.post("/api/auth/logout", headers=headers).status_code == 204
    assert client.get("/api/auth/me", headers=headers).status_code == 401


def test_expired_token_is_refused(client: TestClient) -> None:
    headers = login(client)
    token_hash = hashlib.sha256(headers["Authorization"][7:].encode()).hexdigest()
    with state_of(client).db.transaction() as session:
        row = session.scalar(select(ApiToken).where(ApiToken.token_hash == token_hash))
        assert row is not None
        row.expires_at = utcnow() - dt.timedelta(seconds=1)
    assert client.get("/api/auth/me", headers=headers).status_code == 401


def test_tokens_and_passwords_are_stored_hashed(client: TestClient) -> None:
    headers = login(client)
    token = headers["Authorization"][7:]
    raw = stored_bytes(state_of(client).db)
    assert hashlib.sha256(token.encode()).hexdigest().encode() in raw  # the row is there, hashed
    assert token.encode() not in raw
    assert ADMIN_PASSWORD.encode() not in raw
    assert b"$argon2id$" in raw


def test_web_login_sets_a_strict_httponly_cookie_and_the_api_accepts_it(client: TestClient) -> None:
    response = client.post("/login", data={"username": "admin", "password": ADMIN_PASSWORD},
                           follow_redirects=False)
    assert response.status_code == 303
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    assert client.get("/api/persons").status_code == 200  # the cookie jar now carries the session
    # A cookie-authenticated write from another origin is refused even if a browser sent the cookie.
    refused = client.post("/api/persons", json={"name": "X", "consent": True},
                          headers={"Origin": "https://evil.example"})
    assert refused.status_code == 403
    client.cookies.clear()


def test_enroll_identify_verify_are_rate_limited_per_user(tmp_path: Path) -> None:
    config = make_config(tmp_path, rate_limit={"per_minute": 1, "burst": 2})
    with TestClient(create_app(config, start_mqtt=False)) as limited:
        headers = login(limited)
        codes = [limited.post("/api/identify", headers=headers).status_code for _ in range(3)]
        assert codes[:2] == [422, 422]  # allowed through to validation (no image sent)
        assert codes[2] == 429
        last = limited.post("/api/verify", headers=headers)
        assert last.status_code == 429 and int(last.headers["retry-after"]) >= 1
        other = add_viewer(limited, "another")
        assert limited.post("/api/identify", headers=other).status_code == 403  # role before bucket


def test_oversized_request_body_is_refused_before_parsing(client: TestClient) -> None:
    headers = login(client)
    limits = state_of(client).config.upload
    size = limits.max_files * limits.max_bytes + (2 << 20)
    response = client.post("/api/enroll", headers={**headers, "Content-Length": str(size)}, content=b"x")
    assert response.status_code == 413


def test_api_docs_need_a_login_and_work_offline(client: TestClient) -> None:
    """/docs and /openapi.json are behind auth; Swagger UI's files are served locally (no CDN)."""
    assert client.get("/docs").status_code == 401
    assert client.get("/openapi.json").status_code == 401
    page = client.get("/docs", headers=login(client))
    assert page.status_code == 200
    assert "script-src 'self' 'unsafe-inline'" in page.headers["content-security-policy"]
    assert "cdn." not in page.text and "https://" not in page.text
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        assert f"/docs-assets/{asset}" in page.text
        served = client.get(f"/docs-assets/{asset}")
        assert served.status_code == 200 and len(served.content) > 10_000
