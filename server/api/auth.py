"""Login (the one route open without a token), logout and who-am-I."""

from __future__ import annotations

import math

from fastapi import APIRouter, HTTPException, Request, Response, status

from server.api.deps import SESSION_COOKIE, PrincipalDep, SessionDep, StateDep
from server.api.schemas import LoginRequest, Me, TokenResponse
from server.audit.log import SYSTEM_ACTOR, AuditAction, record
from server.auth.service import AuthError, authenticate, issue_token, revoke_token
from server.state import AppState

router = APIRouter(prefix="/api/auth", tags=["auth"])

# Routes reachable without a token (the OpenAPI walk test checks this list is all there is). The
# operations endpoints (server/api/ops.py) carry only up/down, counts and route templates.
PUBLIC_ROUTES = frozenset({("POST", "/api/auth/login"), ("GET", "/healthz"), ("GET", "/metrics")})


def login_or_raise(state: AppState, session: SessionDep, body: LoginRequest, client: str) -> TokenResponse:
    """Check the login rate limit and the password; issue a token or raise 401/429."""
    # Per address whatever the user name (cycling names buys nothing), and globally (bounds argon2 work).
    # Failures spend the budget; a successful login gets its tokens back.
    address = f"login:{client}"
    wait = state.login_limiter.take(address)
    if wait <= 0:
        wait = state.login_global.take("login")
        if wait > 0:
            state.login_limiter.refund(address)
    if wait > 0:
        raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS,
                            f"too many login attempts; retry in {wait:.0f}s",
                            headers={"Retry-After": str(max(1, math.ceil(wait)))})
    try:
        user = authenticate(session, body.username, body.password)
    except AuthError as exc:
        summary = state.failed_logins.note(client, body.username)
        if summary is not None:  # one row per address per window, with the count, not one per failure
            failures, names = summary
            record(session, SYSTEM_ACTOR, AuditAction.LOGIN_FAILED,
                   f"{failures} failed login(s) from {client}",
                   data={"client": client, "failures": failures, "usernames": names})
            session.commit()
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, str(exc),
                            headers={"WWW-Authenticate": "Bearer"}) from exc
    state.login_limiter.refund(address)
    state.login_global.refund("login")
    token, row = issue_token(session, user, state.config.auth.token_ttl_s)
    session.commit()
    return TokenResponse(access_token=token, expires_at=row.expires_at, role=user.role,
                         username=user.username)


@router.post("/login", response_model=TokenResponse, summary="Exchange username and password for a token")
def login(body: LoginRequest, request: Request, state: StateDep, session: SessionDep) -> TokenResponse:
    """Return a bearer token valid for ``auth.token_ttl_s``."""
    client = request.client.host if request.client else "unknown"
    return login_or_raise(state, session, body, client)


@router.post("/logout", status_code=status.HTTP_204_NO_CONTENT, summary="Revoke the current token")
def logout(who: PrincipalDep, session: SessionDep) -> Response:
    """Revoke the token used for this request and clear the web session cookie."""
    revoke_token(session, who.token_id)
    session.commit()
    response = Response(status_code=status.HTTP_204_NO_CONTENT)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


@router.get("/me", response_model=Me, summary="The caller")
def me(who: PrincipalDep) -> Me:
    """Username and role of the token's user."""
    return Me(username=who.username, role=who.role.value)
