"""Door keys (admin only): which doors the site's gallery key is wrapped to; revoke or approve a door.

Revoking a door rotates the site's gallery key at once and publishes the gallery delta again under the
new key, wrapped only to the remaining doors (see :mod:`server.bundles.sitekeys`). Build and publish a
new bundle afterwards so the bundle's gallery moves to the new key too.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, status
from pydantic import BaseModel

from server.api.deps import AdminDep, SessionDep, StateDep
from server.audit.log import AuditAction, record
from server.bundles.delta import MqttGallerySync
from server.bundles.sitekeys import SiteKeyError
from server.enrollment.sync import SyncError
from server.state import AppState

router = APIRouter(prefix="/api/devices", tags=["devices"])


class DoorRevoked(BaseModel):
    """The outcome of revoking a door."""

    device: str
    gallery_key_version: int
    delta_sequence: int


class DoorApproved(BaseModel):
    """The outcome of approving a door's key."""

    device: str
    delta_sequence: int


def _sync(state: AppState) -> MqttGallerySync:
    sync = state.sync
    if not isinstance(sync, MqttGallerySync) or sync.keyring is None:
        raise HTTPException(status.HTTP_409_CONFLICT, "gallery encryption is not running on this server "
                            "(MQTT off, no signing key, or [bundles] encrypt_gallery = false)")
    return sync


@router.get("/keys", summary="Every door's gallery-key state (trusted, revoked, a pending new key)")
def door_keys(state: StateDep, _who: AdminDep) -> dict[str, Any]:
    """The current gallery key version and each door's key state."""
    sync = _sync(state)
    assert sync.keyring is not None  # noqa: S101 - _sync checked it
    return {"gallery_key_version": sync.keyring.current_version, "doors": sync.keyring.doors()}


@router.post("/{device_id}/revoke", response_model=DoorRevoked,
             summary="Revoke a door: rotate the gallery key, wrap it only to the other doors")
def revoke_door(device_id: str, state: StateDep, who: AdminDep, session: SessionDep) -> DoorRevoked:
    """Stop wrapping gallery keys to ``device_id`` and publish the delta under a new key."""
    sync = _sync(state)
    try:
        version, seq = sync.revoke_door(device_id)
    except (SyncError, SiteKeyError) as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
    record(session, who.username, AuditAction.DOOR_REVOKED,
           f"door {device_id!r} revoked; gallery key version {version}, delta {seq}", subject=device_id)
    session.commit()
    return DoorRevoked(device=device_id, gallery_key_version=version, delta_sequence=seq)


@router.post("/{device_id}/approve-key", response_model=DoorApproved,
             summary="Trust the key a door reported last (a re-installed or re-admitted door)")
def approve_door(device_id: str, state: StateDep, who: AdminDep, session: SessionDep) -> DoorApproved:
    """Trust ``device_id``'s reported key and publish the delta with a wrap to it."""
    sync = _sync(state)
    try:
        seq = sync.approve_door(device_id)
    except SiteKeyError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc
    except SyncError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
    record(session, who.username, AuditAction.DOOR_KEY_APPROVED, f"door {device_id!r} key approved",
           subject=device_id)
    session.commit()
    return DoorApproved(device=device_id, delta_sequence=seq)
