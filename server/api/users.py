"""User administration (admin only): disable or enable a user, revoke a user's or one token."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, status
from pydantic import BaseModel

from server.api.deps import AdminDep, SessionDep
from server.audit.log import AuditAction, record
from server.auth.service import AuthError, revoke_user_tokens, set_user_disabled
from server.db.models import ApiToken, User

router = APIRouter(prefix="/api/users", tags=["users"])


class UserState(BaseModel):
    """A user's state after an administrative change."""

    username: str
    disabled: bool
    tokens_revoked: int


def _set(who: AdminDep, session: SessionDep, username: str, disabled: bool) -> UserState:
    try:
        user, revoked = set_user_disabled(session, username, disabled)
    except AuthError as exc:
        code = status.HTTP_404_NOT_FOUND if "no user" in str(exc) else status.HTTP_409_CONFLICT
        raise HTTPException(code, str(exc)) from exc
    action = AuditAction.USER_DISABLED if disabled else AuditAction.USER_ENABLED
    record(session, who.username, action, f"{action.value} {username!r} ({revoked} token(s) revoked)",
           subject=username)
    session.commit()
    return UserState(username=user.username, disabled=user.disabled, tokens_revoked=revoked)


@router.post("/{username}/disable", response_model=UserState, summary="Disable a user and revoke its tokens")
def disable_user(username: str, who: AdminDep, session: SessionDep) -> UserState:
    """Refuse every login and token of ``username`` from now on."""
    return _set(who, session, username, True)


@router.post("/{username}/enable", response_model=UserState, summary="Enable a disabled user")
def enable_user(username: str, who: AdminDep, session: SessionDep) -> UserState:
    """Let ``username`` log in again (its old tokens stay revoked)."""
    return _set(who, session, username, False)


@router.post("/{username}/revoke-tokens", response_model=UserState, summary="Revoke every token of a user")
def revoke_tokens(username: str, who: AdminDep, session: SessionDep) -> UserState:
    """Revoke all of ``username``'s tokens (sessions and API tokens); the user stays enabled."""
    from sqlalchemy import select

    user = session.scalar(select(User).where(User.username == username))
    if user is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no user {username!r}")
    revoked = revoke_user_tokens(session, user)
    record(session, who.username, AuditAction.TOKENS_REVOKED, f"revoked {revoked} token(s) of {username!r}",
           subject=username)
    session.commit()
    return UserState(username=user.username, disabled=user.disabled, tokens_revoked=revoked)


@router.delete("/tokens/{token_id}", status_code=status.HTTP_204_NO_CONTENT, summary="Revoke one token")
def revoke_one_token(token_id: int, who: AdminDep, session: SessionDep) -> None:
    """Revoke the token with this id (any user's)."""
    row = session.get(ApiToken, token_id)
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no token {token_id}")
    row.revoked = True
    owner = row.user.username
    record(session, who.username, AuditAction.TOKENS_REVOKED, f"revoked token {token_id} of {owner!r}",
           subject=owner)
    session.commit()
