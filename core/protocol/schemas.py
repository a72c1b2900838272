"""Versioned wire payloads of every facegate MQTT message (both sides import these).

Every payload is a frozen pydantic model with ``schema_version`` and ``extra="forbid"``: a
receiver rejects unknown fields and newer versions with a clear :class:`PayloadError`
instead of guessing. JSON payloads are UTF-8; bundle chunks use the binary framing in
:mod:`core.protocol.chunks`. :func:`json_schemas` exports every schema for the README.
"""

from __future__ import annotations

import json
import math
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, field_validator

from core.types import Decision, DecisionKind, LivenessVerdict

SCHEMA_VERSION = 1
# Largest JSON payload a receiver parses; bigger ones are rejected before decoding (memory bound).
MAX_JSON_BYTES = 1 << 20
# Gallery deltas carry embeddings of added persons, so they may be larger.
MAX_DELTA_BYTES = 32 << 20
# Clamp for non-finite or absurd scores so the JSON stays valid (JSON has no NaN/inf).
SCORE_LIMIT = 1e6

Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="Lower-case hex sha256.")]
DeviceId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
ShortText = Annotated[str, Field(max_length=256)]
Identifier = Annotated[str, Field(min_length=1, max_length=128)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class PayloadError(ValueError):
    """A message body is not valid JSON or does not match its schema; the text names fields, not values."""


def describe_validation_error(exc: ValidationError) -> str:
    """'loc: type' for each error, without the offending input (it may be huge or sensitive)."""
    parts = []
    for err in exc.errors(include_input=False, include_url=False)[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        parts.append(f"{loc}: {err['type']}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")


def utcnow() -> datetime:
    """Timezone-aware current UTC time."""
    return datetime.now(UTC)


class Payload(BaseModel):
    """Base of every JSON payload: frozen, unknown keys rejected, a schema version."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    max_bytes: ClassVar[int] = MAX_JSON_BYTES

    schema_version: Literal[1] = Field(1, description="Payload schema version.")

    def to_bytes(self) -> bytes:
        """Compact UTF-8 JSON."""
        return self.model_dump_json(exclude_none=False).encode("utf-8")

    @classmethod
    def parse(cls, raw: bytes | str) -> Self:
        """Decode and validate; raise PayloadError saying what was wrong."""
        data = raw.encode("utf-8") if isinstance(raw, str) else raw
        if len(data) > cls.max_bytes:
            raise PayloadError(f"{cls.__name__}: {len(data)} bytes exceeds the {cls.max_bytes} byte limit")
        try:
            return cls.model_validate_json(data)
        except ValidationError as exc:
            raise PayloadError(f"{cls.__name__}: {describe_validation_error(exc)}") from exc
        except (ValueError, RecursionError) as exc:
            raise PayloadError(f"{cls.__name__}: not valid JSON ({type(exc).__name__})") from exc


# ----------------------------------------------------------------------------- events


class LivenessCheckPayload(BaseModel):
    """One liveness check in an event."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: ShortText
    score: FiniteFloat | None
    verdict: LivenessVerdict
    detail: ShortText = ""


class LivenessPayload(BaseModel):
    """The fused liveness verdict and each check."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    verdict: LivenessVerdict
    checks: list[LivenessCheckPayload] = Field(default_factory=list, max_length=32)


class EventPayload(Payload):
    """An access decision on ``…/<device>/events`` (QoS 1, never images)."""

    event_id: uuid.UUID = Field(..., description="Unique id; subscribers de-duplicate on it.")
    seq: int = Field(0, ge=0, description="Device-local monotonic sequence (gaps mean lost events).")
    ts: AwareDatetime = Field(..., description="When the decision was made (ISO-8601, UTC).")
    device: DeviceId
    decision: DecisionKind
    person_id: Identifier | None = None
    name: ShortText | None = None
    score: FiniteFloat = Field(..., description="Best gallery cosine similarity.")
    margin: FiniteFloat = Field(..., description="Best score minus the runner-up identity's score.")
    liveness: LivenessPayload
    latencies_ms: dict[ShortText, FiniteFloat] = Field(default_factory=dict, description="Per stage.")
    model_version: ShortText = ""
    gallery_version: ShortText = ""
    snapshot: bool = Field(
        False, description="A JPEG with this event_id was queued on the snapshot topic (opt-in, best-effort)."
    )
    reason: ShortText | None = Field(
        None, description="Why a recognised person was denied ('blocked', 'outside_schedule', 'door_fault'), "
                          "or what failed (door_fault).",
    )
    requested_by: ShortText | None = Field(None, description="manual_unlock: who asked (operator, HA, CLI).")
    correlation_id: Identifier | None = Field(None, description="manual_unlock: the command's correlation.")
    seconds: FiniteFloat | None = Field(None, ge=0, description="manual_unlock: how long the door opened.")

    def to_bytes(self) -> bytes:
        """Compact UTF-8 JSON; optional fields that are unset are left out so other events stay as before."""
        exclude = {name for name in OPTIONAL_EVENT_FIELDS if getattr(self, name) is None} or None
        return self.model_dump_json(exclude_none=False, exclude=exclude).encode("utf-8")


# EventPayload fields only some kinds carry; to_bytes leaves them out when unset.
OPTIONAL_EVENT_FIELDS = ("reason", "requested_by", "correlation_id", "seconds")


# Inclusive seq ranges one confirmation may carry (a batch of the audit writer fits in far fewer).
MAX_CONFIRM_RANGES = 1024


class EventConfirm(Payload):
    """The server's receipt on ``…/<device>/events/confirm`` (QoS 1): these events are stored.

    A door keeps an event in its outbox until a receipt covers it, not only until the broker's PUBACK,
    so a broker that restarts without persistence cannot lose it (see :mod:`device.mqtt.outbox`).
    """

    device: DeviceId
    seqs: list[tuple[Annotated[int, Field(ge=0)], Annotated[int, Field(ge=0)]]] = Field(
        default_factory=list, max_length=MAX_CONFIRM_RANGES,
        description="Stored event seqs as inclusive [first, last] ranges; empty: the server (re)subscribed.")
    ts: AwareDatetime

    @field_validator("seqs")
    @classmethod
    def _ordered(cls, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
        if any(first > last for first, last in ranges):
            raise ValueError("each range must be [first, last] with first <= last")
        return ranges

    @classmethod
    def of(cls, device: str, seqs: list[int]) -> list[EventConfirm]:
        """Receipts for ``seqs`` (any order, duplicates allowed), as few as the range limit allows."""
        ranges: list[tuple[int, int]] = []
        for seq in sorted(set(seqs)):
            if ranges and seq == ranges[-1][1] + 1:
                ranges[-1] = (ranges[-1][0], seq)
            else:
                ranges.append((seq, seq))
        now = utcnow()
        return [cls(device=device, seqs=ranges[i:i + MAX_CONFIRM_RANGES], ts=now)
                for i in range(0, len(ranges), MAX_CONFIRM_RANGES)]


def _finite(value: float) -> float:
    if math.isnan(value):
        return 0.0
    return max(-SCORE_LIMIT, min(SCORE_LIMIT, float(value)))


def decision_to_event(decision: Decision, device_id: str, *, seq: int = 0, event_id: uuid.UUID | None = None,
                      ts: datetime | None = None, snapshot: bool = False) -> EventPayload:
    """The wire form of a Decision (wall-clock timestamp now unless ``ts`` is given; never the image)."""
    checks = [
        LivenessCheckPayload(name=c.name[:256], score=None if c.score is None else _finite(c.score),
                             verdict=c.verdict, detail=c.detail[:256])
        for c in decision.liveness.checks[:32]
    ]
    return EventPayload(
        event_id=event_id or uuid.uuid4(),
        seq=seq,
        ts=ts or utcnow(),
        device=device_id,
        decision=decision.kind,
        person_id=decision.person_id,
        name=decision.name,
        score=_finite(decision.score),
        margin=_finite(decision.margin),
        liveness=LivenessPayload(verdict=decision.liveness.verdict, checks=checks),
        latencies_ms={k[:256]: _finite(v) for k, v in decision.latencies_ms.items()},
        model_version=decision.model_version[:256],
        gallery_version=decision.gallery_version[:256],
        snapshot=snapshot,
        reason=decision.reason[:256] or None,
        requested_by=decision.requested_by[:256] or None,
        correlation_id=decision.correlation_id[:128] or None,
        seconds=None if decision.seconds is None else max(0.0, _finite(decision.seconds)),
    )


# The device id a record made without one carries while it is projected from the event form.
_RECORD_DEVICE = "local"


def decision_record(decision: Decision) -> dict[str, Any]:
    """The JSON-lines / status form of a decision: a projection of the event (``decision_to_event``), so the
    file and the MQTT event cannot drift apart. Never images, chips or embeddings."""
    event = decision_to_event(decision, _RECORD_DEVICE, ts=datetime.fromtimestamp(decision.timestamp, UTC))
    wire = event.model_dump(mode="json")
    return {
        "kind": wire["decision"],
        "person_id": event.person_id,
        "name": event.name,
        "score": round(event.score, 4),
        "margin": round(event.margin, 4),
        "liveness": wire["liveness"],
        "latencies_ms": {k: round(v, 2) for k, v in event.latencies_ms.items()},
        "model_version": event.model_version,
        "gallery_version": event.gallery_version,
        "timestamp": decision.timestamp,
        "source_id": decision.source_id,
        "reason": event.reason,
        # manual_unlock only, like the event's optional fields
        **({"requested_by": event.requested_by or "", "correlation_id": event.correlation_id,
            "seconds": event.seconds} if decision.kind is DecisionKind.MANUAL_UNLOCK else {}),
    }


# ----------------------------------------------------------------------------- status and commands


class VersionsPayload(BaseModel):
    """What a device runs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    software: ShortText = ""
    model: ShortText = ""
    gallery: ShortText = ""
    bundle_sequence: int | None = Field(None, ge=0, description="Active bundle, None when unbundled.")
    delta_sequence: int = Field(0, ge=0, description="Last gallery delta applied.")


class StatusPayload(Payload):
    """Retained device status on ``…/<device>/status``."""

    device: DeviceId
    ts: AwareDatetime
    uptime_s: float = Field(..., ge=0)
    fps: FiniteFloat = Field(0.0, ge=0)
    outbox_depth: int = Field(0, ge=0, description="Events on disk waiting for a PUBACK.")
    outbox_dropped: int = Field(0, ge=0, description="Events evicted because the outbox was full.")
    door: Literal["locked", "unlocked", "fault", "unknown"] = "unknown"
    queue_drops: int = Field(0, ge=0, description="Frames dropped by the capture queue.")
    challenge: ShortText | None = Field(None, description="Active liveness challenge, if any.")
    versions: VersionsPayload = VersionsPayload()
    liveness: ShortText = Field("", description="Liveness checks the door runs; 'liveness off' when none.")
    warnings: list[ShortText] = Field(
        default_factory=list, max_length=16,
        description="Unsafe settings in force ('liveness off', tau below the calibrated floor); [] if none.",
    )


CommandName = Literal["unlock", "reload", "sync"]


class CommandRequest(Payload):
    """A command on ``…/<device>/cmd/<name>/set``.

    ``ts`` is what the device checks before obeying: a command without it, older than
    ``mqtt.command_max_age_s``, or delivered as a retained message is refused with the reason.
    Home Assistant's lock renders it with ``now()`` in its ``command_template``.
    """

    correlation_id: Identifier | None = Field(None, description="Echoed in the response.")
    ts: AwareDatetime | None = Field(None, description="When the command was sent (ISO-8601 with a zone).")
    seconds: FiniteFloat | None = Field(None, gt=0, le=3600, description="unlock: how long.")
    action: Literal["LOCK", "UNLOCK"] | None = Field(None, description="unlock: Home Assistant lock payload.")
    requested_by: ShortText | None = None


class CommandResponse(Payload):
    """A device's answer on ``…/<device>/cmd/<name>/response``."""

    correlation_id: Identifier | None
    device: DeviceId
    command: ShortText
    ok: bool
    detail: ShortText = ""
    ts: AwareDatetime


# ----------------------------------------------------------------------------- bundles


class BundleFile(BaseModel):
    """One file of a bundle, relative to the bundle root."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")]
    sha256: Sha256Hex
    size: int = Field(..., ge=0, le=1 << 34)

    @field_validator("path")
    @classmethod
    def _no_dot_segments(cls, value: str) -> str:
        if any(part in {".", ".."} for part in value.split("/")):
            raise ValueError("path must not contain '.' or '..' segments")
        return value


class SelfTestSpec(BaseModel):
    """Run ``model`` on a deterministic synthetic chip and expect ``expected`` (cosine >= ``min_cosine``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: Annotated[str, Field(min_length=1, max_length=256)] = Field(..., description="Bundle file path.")
    seed: Annotated[str, Field(min_length=1, max_length=64)] = Field(..., description="Synthetic chip seed.")
    expected: list[FiniteFloat] = Field(..., min_length=1, max_length=65536)
    min_cosine: float = Field(0.99, gt=0, le=1)


Base64 = Annotated[str, Field(min_length=4, max_length=128, pattern=r"^[A-Za-z0-9+/]+={0,2}$")]
MAX_KEY_WRAPS = 4096  # doors x key versions in one payload; a site has far fewer


class KeyWrap(BaseModel):
    """The site's gallery key ``version`` wrapped to one door (``core.gallerycrypto.wrap``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device: DeviceId = Field(..., description="The door this wrap opens for (also in the associated data).")
    version: int = Field(..., ge=1, description="Gallery key version.")
    epk: Base64 = Field(..., description="Ephemeral X25519 public key (base64, 32 bytes).")
    sealed: Base64 = Field(..., description="AES-GCM of the gallery key under the derived key (base64).")


class BundleManifest(BaseModel):
    """What a bundle contains; the signed part of an announcement."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sequence: int = Field(..., ge=1, description="Monotonic; devices refuse anything not above their own.")
    created: AwareDatetime
    model_version: ShortText
    gallery_version: ShortText
    embedder_sha256: Sha256Hex = Field(..., description="sha256 of the embedder .tflite in this bundle.")
    gallery_model_sha256: Sha256Hex = Field(..., description="Embedder sha256 the gallery was built with.")
    files: list[BundleFile] = Field(..., min_length=1, max_length=1024)
    chunk_size: int = Field(..., ge=1024, le=64 << 20, description="Bytes per chunk (last one shorter).")
    selftest: SelfTestSpec | None = None
    gallery_key_version: int | None = Field(
        None, ge=1, description="Gallery key the gallery/ files are sealed under; None: plaintext "
        "(refused by doors that require sealed galleries, the default).")
    keys: list[KeyWrap] = Field(default_factory=list, max_length=MAX_KEY_WRAPS,
                                description="The gallery key wrapped to each door of the site.")

    @field_validator("files")
    @classmethod
    def _unique_paths(cls, files: list[BundleFile]) -> list[BundleFile]:
        paths = [f.path for f in files]
        if len(set(paths)) != len(paths):
            raise ValueError("file paths must be unique")
        return files

    @property
    def total_size(self) -> int:
        """Sum of every file's size."""
        return sum(f.size for f in self.files)

    def chunk_count(self, file_index: int) -> int:
        """How many chunks file ``file_index`` is split into (an empty file still has one)."""
        size = self.files[file_index].size
        return max(1, -(-size // self.chunk_size))

    @property
    def total_chunks(self) -> int:
        """Chunks across all files."""
        return sum(self.chunk_count(i) for i in range(len(self.files)))


class BundleAnnounce(Payload):
    """Retained on ``…/bundles/announce``: the manifest and its Ed25519 signature (base64)."""

    manifest: BundleManifest
    signature: Annotated[str, Field(max_length=256)] | None = Field(None, description="Base64 Ed25519.")
    key_id: Annotated[str, Field(max_length=64)] | None = Field(None, description="Public key fingerprint.")


class ChunkRef(BaseModel):
    """One chunk of one file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file_index: int = Field(..., ge=0, le=1023)
    index: int = Field(..., ge=0, le=1 << 24)


class ChunkRequest(Payload):
    """A device asks for missing chunks on its ``…/<device>/bundle/request``; they come back on its own
    chunk topic."""

    device: DeviceId
    sequence: int = Field(..., ge=1)
    correlation_id: Identifier
    chunks: list[ChunkRef] = Field(..., min_length=1, max_length=4096)


class ChunkHeader(Payload):
    """JSON header of a binary chunk frame (see :mod:`core.protocol.chunks`)."""

    sequence: int = Field(..., ge=1)
    file_index: int = Field(..., ge=0, le=1023)
    index: int = Field(..., ge=0, le=1 << 24)
    total: int = Field(..., ge=1, le=1 << 24, description="Chunks in this file.")
    size: int = Field(..., ge=0, le=64 << 20, description="Bytes of data after the header.")
    sha256: Sha256Hex = Field(..., description="sha256 of this chunk's data.")
    correlation_id: Identifier | None = Field(None, description="Set when answering a ChunkRequest.")


class SnapshotHeader(Payload):
    """JSON header of a snapshot frame on ``…/<device>/snapshot`` (:mod:`core.protocol.snapshots`)."""

    event_id: uuid.UUID = Field(..., description="The event this snapshot belongs to.")
    ts: AwareDatetime = Field(..., description="The event's timestamp.")
    device: DeviceId
    decision: Literal["unknown", "spoof"] = Field(..., description="Snapshots exist for these kinds only.")
    content_type: Literal["image/jpeg"] = "image/jpeg"
    width: int = Field(..., ge=1, le=4096, description="Image width in pixels.")
    height: int = Field(..., ge=1, le=4096, description="Image height in pixels.")
    size: int = Field(..., ge=1, le=4 << 20, description="Bytes of image data after the header.")
    sha256: Sha256Hex = Field(..., description="sha256 of the image data.")


BundleState = Literal["downloading", "verifying", "installed", "rejected", "rolled_back", "idle"]
DeltaState = Literal["applied", "removals_only", "rejected"]


class BundleAck(Payload):
    """Retained per-device progress on ``…/<device>/bundle/ack``: the last bundle and delta outcome."""

    device: DeviceId
    sequence: int = Field(..., ge=0, description="The bundle this ack is about (0: none yet).")
    state: BundleState
    percent: float = Field(0.0, ge=0, le=100)
    reason: ShortText | None = Field(None, description="Why a bundle was rejected or rolled back.")
    running_sequence: int | None = Field(None, ge=0, description="Bundle the device is serving with.")
    delta_sequence: int = Field(0, ge=0, description="Last gallery delta processed.")
    delta_state: DeltaState | None = None
    delta_reason: ShortText | None = None
    ts: AwareDatetime
    door_key: Base64 | None = Field(None, description="The door's X25519 public key (base64): gallery keys "
                                    "are wrapped to it.")


class DeltaPerson(BaseModel):
    """A person to add (or replace) with their templates."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    person_id: Identifier
    name: ShortText
    vectors: list[list[FiniteFloat]] = Field(..., min_length=1, max_length=64)

    @field_validator("vectors")
    @classmethod
    def _same_dims(cls, vectors: list[list[float]]) -> list[list[float]]:
        dims = {len(v) for v in vectors}
        if len(dims) != 1 or not 1 <= next(iter(dims)) <= 4096:
            raise ValueError("every vector must have the same length, 1..4096")
        return vectors


class GalleryDelta(Payload):
    """Retained, signed, cumulative gallery changes on ``…/bundles/delta`` (no models resent).

    Cumulative: ``add`` holds every person added or changed since bundle ``bundle_sequence`` was
    built, ``remove`` every person ever removed (tombstones). Applying it twice is harmless, so a
    device that missed deltas only needs the latest (retained) one.
    """

    max_bytes: ClassVar[int] = MAX_DELTA_BYTES

    seq: int = Field(..., ge=1, description="Monotonic delta number.")
    bundle_sequence: int = Field(..., ge=0, description="Bundle whose gallery ``add`` is relative to.")
    model_sha256: Sha256Hex = Field(..., description="Embedder the added vectors come from.")
    created: AwareDatetime
    add: list[DeltaPerson] = Field(default_factory=list, max_length=100_000)
    remove: list[Identifier] = Field(default_factory=list, max_length=1_000_000)
    key_version: int | None = Field(None, ge=1, description="Gallery key of ``sealed`` (None: plaintext).")
    sealed: str | None = Field(None, max_length=MAX_DELTA_BYTES, description="Base64 AES-GCM of the JSON "
                               "{add, remove} (then ``add`` and ``remove`` are empty on the wire).")
    keys: list[KeyWrap] = Field(default_factory=list, max_length=MAX_KEY_WRAPS,
                                description="Gallery keys wrapped to each door of the site.")
    signature: Annotated[str, Field(max_length=256)] | None = None

    def signed_part(self) -> dict[str, Any]:
        """Everything but the signature, as JSON-ready data."""
        return self.model_dump(mode="json", exclude={"signature"})


def canonical_json(data: Any) -> bytes:
    """Deterministic JSON bytes for signing: sorted keys, no spaces, UTF-8."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def manifest_bytes(manifest: BundleManifest) -> bytes:
    """The bytes an announcement's signature covers."""
    return canonical_json(manifest.model_dump(mode="json"))


PAYLOADS: dict[str, type[Payload]] = {
    "event": EventPayload,
    "status": StatusPayload,
    "command_request": CommandRequest,
    "command_response": CommandResponse,
    "bundle_announce": BundleAnnounce,
    "chunk_header": ChunkHeader,
    "snapshot_header": SnapshotHeader,
    "chunk_request": ChunkRequest,
    "bundle_ack": BundleAck,
    "gallery_delta": GalleryDelta,
}


def json_schemas() -> dict[str, dict[str, Any]]:
    """JSON Schema of every payload, keyed by name (for the README and external subscribers)."""
    return {name: model.model_json_schema() for name, model in PAYLOADS.items()}
