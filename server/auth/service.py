"""Users, argon2 password hashes and bearer tokens (stored only as sha256).

Tokens are 256-bit random strings, so a fast hash is enough to make a stolen database useless
for authentication; passwords are low-entropy and get argon2id.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import logging
import re
import secrets
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from server.db.models import ApiToken, User, utcnow

logger = logging.getLogger(__name__)

TOKEN_PREFIX = "fg_"  # noqa: S105 - marks facegate tokens in logs and scanners, not a secret
TOKEN_BYTES = 32
USERNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_HASHER = PasswordHasher()
# A real hash verified for unknown users so that login timing does not reveal which usernames exist.
_DUMMY_HASH = _HASHER.hash(secrets.token_urlsafe(16))


class Role(enum.StrEnum):
    """What a user may do: admins enroll and delete, viewers read events and devices."""

    ADMIN = "admin"
    VIEWER = "viewer"


class AuthError(Exception):
    """Bad credentials, a bad token, or an invalid user definition."""


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller of a request."""

    user_id: int
    username: str
    role: Role
    token_id: int

    @property
    def is_admin(self) -> bool:
        """True for the admin role."""
        return self.role is Role.ADMIN


def hash_token(token: str) -> str:
    """sha256 hex of a bearer token (what the database keeps)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_user(session: Session, username: str, password: str, role: Role, min_length: int = 10) -> User:
    """Add a user with an argon2id hash; raise AuthError on a bad name, short password or duplicate."""
    if not USERNAME_RE.match(username):
        raise AuthError("username must be 1-64 characters of letters, digits, '_', '.', '-'")
    if len(password) < min_length:
        raise AuthError(f"password must have at least {min_length} characters")
    if session.scalar(select(User).where(User.username == username)) is not None:
        raise AuthError(f"user {username!r} already exists")
    user = User(username=username, password_hash=_HASHER.hash(password), role=role.value)
    session.add(user)
    session.flush()
    return user


def authenticate(session: Session, username: str, password: str) -> User:
    """The enabled user with this password; AuthError otherwise (same message either way)."""
    user = session.scalar(select(User).where(User.username == username))
    try:
        _HASHER.verify(user.password_hash if user else _DUMMY_HASH, password)
    except (VerificationError, InvalidHashError) as exc:
        raise AuthError("invalid username or password") from exc
    if user is None or user.disabled:
        raise AuthError("invalid username or password")
    if _HASHER.check_needs_rehash(user.password_hash):
        user.password_hash = _HASHER.hash(password)
    return user


def issue_token(session: Session, user: User, ttl_s: int | None, name: str = "login") -> tuple[str, ApiToken]:
    """Create a token for ``user`` (``ttl_s`` None: no expiry); return the plain token once and its row."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)
    expires = utcnow() + dt.timedelta(seconds=ttl_s) if ttl_s is not None else None
    row = ApiToken(user_id=user.id, token_hash=hash_token(token), name=name, expires_at=expires)
    session.add(row)
    session.flush()
    return token, row


def resolve_token(session: Session, token: str) -> Principal | None:
    """The principal of a valid, unexpired, unrevoked token of an enabled user, else None."""
    if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
        return None
    row = session.scalar(select(ApiToken).where(ApiToken.token_hash == hash_token(token)))
    if row is None or row.revoked:
        return None
    if row.expires_at is not None and row.expires_at <= utcnow():
        return None
    user = row.user
    if user.disabled:
        return None
    try:
        role = Role(user.role)
    except ValueError:
        logger.warning("user %s has an unknown role; token refused", user.username)
        return None
    return Principal(user_id=user.id, username=user.username, role=role, token_id=row.id)


def revoke_token(session: Session, token_id: int) -> None:
    """Mark a token revoked (logout)."""
    row = session.get(ApiToken, token_id)
    if row is not None:
        row.revoked = True


def revoke_user_tokens(session: Session, user: User) -> int:
    """Revoke every live token of ``user``; return how many were revoked."""
    live = [row for row in user.tokens if not row.revoked]
    for row in live:
        row.revoked = True
    return len(live)


def set_user_disabled(session: Session, username: str, disabled: bool) -> tuple[User, int]:
    """Disable (revoking every token) or enable a user; refuse to disable the last enabled admin."""
    user = session.scalar(select(User).where(User.username == username))
    if user is None:
        raise AuthError(f"no user {username!r}")
    if disabled and user.role == Role.ADMIN.value and not user.disabled:
        admins = session.scalars(select(User).where(User.role == Role.ADMIN.value,
                                                    User.disabled.is_(False))).all()
        if len(admins) <= 1:
            raise AuthError("refusing to disable the last enabled admin")
    user.disabled = disabled
    revoked = revoke_user_tokens(session, user) if disabled else 0
    return user, revoked


def bootstrap_admin(session: Session, username: str | None, password: str | None, min_length: int) -> bool:
    """Create the first admin when the user table is empty and a password is configured."""
    if username is None or session.scalar(select(User.id).limit(1)) is not None:
        return False
    if not password:
        logger.warning(
            "no users yet: set FACEGATE_SERVER__AUTH__BOOTSTRAP_PASSWORD or run `facegate server create-user`"
        )
        return False
    create_user(session, username, password, Role.ADMIN, min_length)
    logger.info("created bootstrap admin %s", username)
    return True
