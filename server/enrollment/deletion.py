"""Erasure of a person: purge chips and embeddings, publish a gallery removal, wait for the doors' acks,
then record "deleted; confirmed by devices ..." in the audit log.

The request is pending until every device known at request time acknowledged a delta (or bundle)
with a sequence at or after the removal. Acks are stored by the audit subscriber as they arrive, so
an ack that lands before the request learns its sequence is still counted (see :meth:`reconcile`).
"""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy import select
from sqlalchemy.orm import Session

from server.audit.log import AuditAction, record
from server.db.models import BundleAckRow, DeletionDevice, DeletionRequest, Device, Person, utcnow
from server.db.session import Database
from server.enrollment.index import EnrollmentIndex
from server.enrollment.sync import GallerySync, SyncError

logger = logging.getLogger(__name__)

# Delta ack states (``BundleAck.delta_state``) meaning the device applied the removals. Deltas are
# cumulative (every removal ever made is a tombstone), so applying any later delta also confirms.
SUCCESS_STATES = frozenset({"applied", "removals_only"})
DELTA_KIND = "delta"
PENDING, CONFIRMED = "pending", "confirmed"


class DeletionError(Exception):
    """The person does not exist or the deletion cannot be recorded."""


class DeletionService:
    """Creates deletion requests and confirms them from device acks."""

    def __init__(self, db: Database, index: EnrollmentIndex, sync: GallerySync,
                 model_sha256: str = "") -> None:
        self.db = db
        self.index = index
        self.sync = sync
        self.model_sha256 = model_sha256
        self._changed = threading.Condition()

    def request(self, session: Session, actor: str, person_id: str) -> DeletionRequest:
        """Purge the person now, publish the removal, and return the (possibly pending) request."""
        person = session.get(Person, person_id)
        if person is None:
            raise DeletionError(f"person {person_id} does not exist")
        template_ids = sorted(t.id for t in person.templates)
        models = sorted({t.model_sha256 for t in person.templates})
        devices = sorted(session.scalars(select(Device.device_id)))
        req = DeletionRequest(person_id=person.id, requested_by=actor, template_ids=template_ids)
        req.devices = [DeletionDevice(device_id=d) for d in devices]
        session.add(req)
        record(session, actor, AuditAction.DELETE_REQUESTED,
               f"deletion of {person.name!r} requested: {len(template_ids)} template(s) and chips purged; "
               f"waiting for {len(devices)} device(s)",
               person_id=person.id, subject=person.name, consent=person.consent,
               data={"request": req.id, "templates": template_ids, "devices": devices})
        session.delete(person)  # cascades to chips and templates
        session.commit()
        self.index.invalidate()
        sequence: int | None = None
        try:
            for model in models or [self.model_sha256]:
                sequence = self.sync.publish_remove(model, person_id, template_ids)
        except SyncError as exc:
            logger.warning("gallery removal for deletion %s not published: %s", req.id, exc)
            req.detail = f"removal not published yet: {exc}"
        req.delta_sequence = sequence
        if sequence is None and devices and not req.detail:
            req.detail = "MQTT is disabled: no removal was published; devices cannot confirm"
        session.commit()
        # Locked like on_acks does: an ack stored meanwhile (here or by another replica) is either
        # committed before this reads it, or its transaction waits and then sees this request.
        locked = self._locked(session, [req.id])
        if locked:
            self.reconcile(session, locked[0])
        session.commit()
        return req

    @staticmethod
    def _locked(session: Session, request_ids: list[str]) -> list[DeletionRequest]:
        """The pending requests among ``request_ids``, their rows locked in id order and read fresh.

        Two replicas storing different doors' acks for one request would otherwise each see the other
        door still pending and neither would confirm it (PostgreSQL; SQLite has one writer anyway).
        """
        locked = list(session.scalars(
            select(DeletionRequest)
            .where(DeletionRequest.id.in_(request_ids), DeletionRequest.status == PENDING)
            .order_by(DeletionRequest.id)
            .with_for_update()
            .execution_options(populate_existing=True)
        ))
        if locked:  # and their per-device states as committed now, not as this session first saw them
            session.scalars(select(DeletionDevice)
                            .where(DeletionDevice.request_id.in_([r.id for r in locked]))
                            .execution_options(populate_existing=True)).all()
        return locked

    def reconcile(self, session: Session, req: DeletionRequest) -> bool:
        """Confirm devices that already acked a delta >= the removal's; finish when all did."""
        if req.status != PENDING:
            return False
        if req.delta_sequence is not None:
            for part in req.devices:
                if part.state != PENDING:
                    continue
                ack = session.scalar(
                    select(BundleAckRow)
                    .where(BundleAckRow.device_id == part.device_id,
                           BundleAckRow.kind == DELTA_KIND,
                           BundleAckRow.sequence >= req.delta_sequence,
                           BundleAckRow.state.in_(SUCCESS_STATES))
                    .order_by(BundleAckRow.sequence)
                    .limit(1)
                )
                if ack is not None:
                    part.state, part.acked_at = CONFIRMED, ack.at
                    part.detail = f"acked gallery delta {ack.sequence} ({ack.state})"
        if any(part.state == PENDING for part in req.devices):
            return False
        if req.devices and req.delta_sequence is None:
            return False
        req.status, req.confirmed_at = CONFIRMED, utcnow()
        names = ", ".join(p.device_id for p in req.devices) or "none registered"
        record(session, "system", AuditAction.DELETED, f"deleted; confirmed by devices {names}",
               person_id=req.person_id,
               data={"request": req.id, "sequence": req.delta_sequence,
                     "devices": [p.device_id for p in req.devices]})
        logger.info("deletion %s confirmed by %d device(s)", req.id, len(req.devices))
        return True

    def on_acks(self, session: Session, device_ids: set[str]) -> int:
        """Reconcile the pending requests that wait on any of ``device_ids``; return how many finished."""
        # IN (subquery), not JOIN + DISTINCT: PostgreSQL has no equality for the JSON column template_ids.
        waiting = select(DeletionDevice.request_id).where(DeletionDevice.device_id.in_(device_ids))
        ids = list(session.scalars(select(DeletionRequest.id).where(DeletionRequest.status == PENDING,
                                                                    DeletionRequest.id.in_(waiting))))
        return sum(1 for req in self._locked(session, ids) if self.reconcile(session, req))

    def notify(self) -> None:
        """Wake waiters (called after acks were committed)."""
        with self._changed:
            self._changed.notify_all()

    def wait(self, request_id: str, timeout_s: float) -> DeletionRequest | None:
        """Block until the request is confirmed or ``timeout_s`` passes; return its latest state."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self.db.session() as session:
                req = session.get(DeletionRequest, request_id)
                if req is None:
                    return None
                _ = list(req.devices)  # load before the session closes
                remaining = deadline - time.monotonic()
                if req.status != PENDING or remaining <= 0:
                    return req
            with self._changed:
                self._changed.wait(timeout=min(remaining, 1.0))
