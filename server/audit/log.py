"""The audit log: who enrolled whom (with the consent flag), who deleted whom and which devices confirmed."""

from __future__ import annotations

import enum
import logging
from typing import Any

from sqlalchemy.orm import Session

from server.db.models import AuditEntry

logger = logging.getLogger(__name__)

SYSTEM_ACTOR = "system"


class AuditAction(enum.StrEnum):
    """Kinds of audit entries."""

    PERSON_CREATED = "person_created"
    PERSON_UPDATED = "person_updated"
    ENROLLED = "enrolled"
    DUPLICATE_OVERRIDE = "duplicate_override"
    DELETE_REQUESTED = "delete_requested"
    DELETED = "deleted"
    USER_CREATED = "user_created"
    TOKEN_CREATED = "token_created"  # noqa: S105 - an action name
    LOGIN_FAILED = "login_failed"
    USER_DISABLED = "user_disabled"
    USER_ENABLED = "user_enabled"
    TOKENS_REVOKED = "tokens_revoked"
    KEY_ROTATED = "key_rotated"
    FACE_VIEWED = "face_viewed"  # an admin saw a stored face on the enrollment station
    DOOR_REVOKED = "door_revoked"  # a door's key revoked; the site's gallery key rotated
    DOOR_KEY_APPROVED = "door_key_approved"  # an admin trusted the key a door reported


def record(
    session: Session,
    actor: str,
    action: AuditAction,
    detail: str,
    *,
    person_id: str | None = None,
    subject: str | None = None,
    consent: bool | None = None,
    data: dict[str, Any] | None = None,
) -> AuditEntry:
    """Add an audit entry to the session (committed with the caller's transaction)."""
    entry = AuditEntry(
        actor=actor,
        action=action.value,
        person_id=person_id,
        subject=subject,
        consent=consent,
        detail=detail,
        data=data or {},
    )
    session.add(entry)
    logger.info("audit %s by %s: %s", action.value, actor, detail)
    return entry
