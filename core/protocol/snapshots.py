"""Opt-in JPEG snapshots of ``unknown`` and ``spoof`` events (``[mqtt] snapshots = true``).

Events never carry images. With snapshots on, the device also publishes, for each ``unknown`` or
``spoof`` event (never ``granted`` or ``denied``), one JPEG of the face region — the detection box
plus a margin, at most 256 px on its longest side — on ``<prefix>/<site>/<device>/snapshot`` with
QoS 1, not retained, and sets ``"snapshot": true`` in that event.

Wire format (works on MQTT 3.1.1 and 5), mirroring the bundle chunk framing of
:mod:`core.protocol.chunks`::

    b"FGS1" | uint32 big-endian header length N | N bytes of SnapshotHeader JSON | JPEG bytes

The header (:class:`core.protocol.schemas.SnapshotHeader`) carries ``event_id``, ``ts``, ``device``,
``decision``, ``content_type`` (``image/jpeg``), ``width``, ``height``, ``size`` and the ``sha256`` of
the JPEG; :func:`decode_snapshot` checks all of that. Join snapshots to events on ``event_id``. On an
MQTT 5 connection the publish also carries the event id (its text form, ASCII) as *correlation data*,
so a v5 subscriber can route without parsing the frame.

Delivery is best-effort, unlike events: snapshots are not written to the outbox. They wait in a small
bounded in-memory queue (:mod:`device.mqtt.snapshots`) and are dropped, counted and logged (event id
only) when it is full, when the broker stays away too long, or when the device stops. A snapshot may
arrive before or after its event, or not at all; ``"snapshot": true`` means one was queued.
"""

from __future__ import annotations

import hashlib
from datetime import datetime

from core.protocol.framing import frame, unframe
from core.protocol.schemas import PayloadError, SnapshotHeader
from core.types import DecisionKind

MAGIC = b"FGS1"
# Decisions that may carry a snapshot; a granted or denied person is known, so no image is needed.
SNAPSHOT_KINDS = frozenset({DecisionKind.UNKNOWN, DecisionKind.SPOOF})


def make_header(event_id: str, ts: datetime, device: str, decision: DecisionKind, jpeg: bytes,
                width: int, height: int) -> SnapshotHeader:
    """The header describing ``jpeg`` for one event."""
    if decision not in SNAPSHOT_KINDS:
        raise PayloadError(f"snapshot: no snapshots for {decision.value} decisions")
    return SnapshotHeader.model_validate({
        "event_id": event_id, "ts": ts, "device": device, "decision": decision.value, "width": width,
        "height": height, "size": len(jpeg), "sha256": hashlib.sha256(jpeg).hexdigest()})


def encode_snapshot_frame(header: SnapshotHeader, jpeg: bytes) -> bytes:
    """Frame ``jpeg`` with its header."""
    return frame(MAGIC, header.to_bytes(), jpeg)


def decode_snapshot(payload: bytes) -> tuple[SnapshotHeader, bytes]:
    """Split a frame into header and JPEG; raise PayloadError when it is malformed or corrupted."""
    raw, data = unframe(payload, MAGIC, "snapshot")
    header = SnapshotHeader.parse(raw)
    if len(data) != header.size:
        raise PayloadError(f"snapshot {header.event_id}: {len(data)} bytes, header says {header.size}")
    if hashlib.sha256(data).hexdigest() != header.sha256:
        raise PayloadError(f"snapshot {header.event_id}: sha256 mismatch")
    return header, data
