"""FastAPI dependencies: the app state, a database session, the caller (bearer token or session cookie),
role checks and per-user rate limiting.

Every route depends on :func:`principal`, so an anonymous request gets 401 before anything else runs;
admin routes add :func:`require_admin` (403 for viewers).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from server.auth.service import Principal, resolve_token
from server.state import AppState

SESSION_COOKIE = "facegate_session"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

bearer_scheme = HTTPBearer(auto_error=False,
                           description="`Authorization: Bearer fg_...` from /api/auth/login")


def get_state(request: Request) -> AppState:
    """The server's shared state."""
    state: AppState = request.app.state.facegate
    return state


def get_session(state: Annotated[AppState, Depends(get_state)]) -> Iterator[Session]:
    """A database session for one request."""
    with state.db.session() as session:
        yield session


StateDep = Annotated[AppState, Depends(get_state)]
SessionDep = Annotated[Session, Depends(get_session)]


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail, headers={"WWW-Authenticate": "Bearer"})


def request_token(request: Request,
                  credentials: HTTPAuthorizationCredentials | None) -> tuple[str, bool] | None:
    """(token, came_from_cookie) from the Authorization header or the session cookie."""
    if credentials is not None and credentials.scheme.lower() == "bearer":
        return credentials.credentials, False
    cookie = request.cookies.get(SESSION_COOKIE)
    return (cookie, True) if cookie else None


def same_origin(request: Request) -> bool:
    """False when a browser says the request comes from another origin."""
    origin = request.headers.get("origin")
    if origin is None:  # not a browser, or a same-origin GET/HEAD
        return True
    return origin.rstrip("/") == str(request.base_url).rstrip("/")


def principal(
    request: Request,
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> Principal:
    """The authenticated caller; 401 without a valid token."""
    found = request_token(request, credentials)
    if found is None:
        raise _unauthorized("authentication required: send 'Authorization: Bearer <token>'")
    token, from_cookie = found
    who = resolve_token(session, token)
    if who is None:
        raise _unauthorized("invalid or expired token")
    # SameSite=Strict already keeps other sites' requests cookie-less; refusing a foreign Origin on
    # cookie-authenticated writes is the second lock.
    if from_cookie and request.method not in SAFE_METHODS and not same_origin(request):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "cross-origin request refused")
    return who


PrincipalDep = Annotated[Principal, Depends(principal)]


def require_admin(who: PrincipalDep) -> Principal:
    """The caller, who must be an admin (403 otherwise)."""
    if not who.is_admin:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "this action needs the admin role")
    return who


AdminDep = Annotated[Principal, Depends(require_admin)]


def rate_limited(who: AdminDep, state: StateDep) -> Principal:
    """An admin within their token bucket (429 with Retry-After otherwise)."""
    wait = state.limiter.take(f"user:{who.user_id}")
    if wait > 0:
        raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS,
                            f"rate limit: retry in {wait:.1f}s",
                            headers={"Retry-After": str(max(1, math.ceil(wait)))})
    return who


LimitedAdminDep = Annotated[Principal, Depends(rate_limited)]
