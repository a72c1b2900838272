"""Wire payloads, chunk framing, topics and the SQLite outbox (no broker needed)."""

from __future__ import annotations

import json
import socket
import threading
import uuid
from pathlib import Path

import pytest

from core.mqtt.client import ClientSettings, MqttClient, Will
from core.protocol.chunks import decode_chunk, make_chunk
from core.protocol.schemas import (
    MAX_CONFIRM_RANGES,
    BundleAnnounce,
    BundleManifest,
    ChunkHeader,
    CommandRequest,
    EventConfirm,
    EventPayload,
    GalleryDelta,
    PayloadError,
    StatusPayload,
    decision_to_event,
    json_schemas,
)
from core.protocol.topics import Topics
from core.types import Decision, DecisionKind, LivenessCheck, LivenessResult, LivenessVerdict
from device.mqtt.outbox import Outbox
from tests.mqtt_kit import wait_until


def _decision(**kw: object) -> Decision:
    base: dict[str, object] = dict(
        kind=DecisionKind.GRANTED, person_id="p-1", name="Ada", score=0.81, margin=0.2,
        liveness=LivenessResult(LivenessVerdict.LIVE,
                                (LivenessCheck("passive", 0.93, LivenessVerdict.LIVE),)),
        latencies_ms={"detect": 4.2, "embed": 11.0}, model_version="embedder-int8@1", gallery_version="3-abc")
    base.update(kw)
    return Decision(**base)  # type: ignore[arg-type]


def test_event_round_trip_carries_every_field() -> None:
    event = decision_to_event(_decision(), "door-1", seq=7)
    parsed = EventPayload.parse(event.to_bytes())
    assert parsed == event
    body = json.loads(event.to_bytes())
    assert body["schema_version"] == 1 and body["decision"] == "granted" and body["seq"] == 7
    check = {"name": "passive", "score": 0.93, "verdict": "live", "detail": ""}
    assert body["liveness"]["checks"][0] == check
    assert uuid.UUID(body["event_id"]) and body["ts"].endswith("Z")
    assert "image" not in body and "embedding" not in body


def test_non_finite_scores_become_valid_json() -> None:
    event = decision_to_event(_decision(kind=DecisionKind.UNKNOWN, person_id=None, name=None,
                                        score=float("nan"), margin=float("-inf")), "door-1")
    body = json.loads(event.to_bytes())
    assert body["score"] == 0.0 and body["margin"] == -1e6 and body["person_id"] is None


@pytest.mark.parametrize("raw", [
    b"", b"\xff\xfe", b"[]", b'{"schema_version": 2}', b'{"schema_version": 1, "surprise": 1}',
    b"[" * 100_000, b'{"a": "' + b"x" * (2 << 20) + b'"}',
])
def test_bad_payloads_are_domain_errors(raw: bytes) -> None:
    for model in (EventPayload, StatusPayload, CommandRequest, BundleAnnounce, GalleryDelta):
        with pytest.raises(PayloadError) as info:
            model.parse(raw)
        assert len(str(info.value)) < 600  # never echoes the payload


def test_command_request_accepts_home_assistant_template() -> None:
    rendered = '{"schema_version": 1, "action": "UNLOCK", "requested_by": "homeassistant"}'
    request = CommandRequest.parse(rendered)
    assert request.action == "UNLOCK" and request.correlation_id is None


def test_chunk_frames_detect_corruption() -> None:
    frame = make_chunk(3, 1, 0, 2, b"abc" * 100, correlation_id="c1")
    header, data = decode_chunk(frame)
    got = (header.sequence, header.file_index, header.index, header.total, data)
    assert got == (3, 1, 0, 2, b"abc" * 100)
    flipped = bytearray(frame)
    flipped[-1] ^= 1
    with pytest.raises(PayloadError, match="sha256"):
        decode_chunk(bytes(flipped))
    with pytest.raises(PayloadError):
        decode_chunk(frame[:-5])
    with pytest.raises(PayloadError, match="magic"):
        decode_chunk(b"nope")
    assert isinstance(ChunkHeader.parse(frame[8:8 + int.from_bytes(frame[4:8], "big")]), ChunkHeader)


def test_manifest_refuses_path_traversal() -> None:
    bad = {"sequence": 1, "created": "2026-01-01T00:00:00Z", "model_version": "m", "gallery_version": "g",
           "embedder_sha256": "a" * 64, "gallery_model_sha256": "a" * 64, "chunk_size": 4096,
           "files": [{"path": "../etc/passwd", "sha256": "a" * 64, "size": 1}]}
    with pytest.raises(ValueError):
        BundleManifest.model_validate(bad)


def test_json_schemas_cover_every_payload() -> None:
    schemas = json_schemas()
    assert {"event", "status", "command_request", "command_response", "bundle_announce", "chunk_header",
            "chunk_request", "bundle_ack", "gallery_delta"} <= set(schemas)
    assert "event_id" in schemas["event"]["properties"]


def test_topics_parse_commands() -> None:
    t = Topics("facegate", "hq")
    assert t.command_of(t.command("door-1", "unlock"), "door-1") == "unlock"
    assert t.command_of(t.command_response("door-1", "unlock"), "door-1") is None
    assert t.command_of("facegate/hq/door-1/cmd/a/b/set", "door-1") is None
    assert t.bundle_chunk_reply("door-1") == "facegate/hq/door-1/bundle/chunk"


def test_outbox_keeps_order_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    with Outbox(path) as box:
        seqs = [box.append(f"e{i}", "t", lambda s, i=i: f"{i}:{s}".encode()) for i in range(5)]
        assert box.delete([seqs[1]]) == 1
    with Outbox(path) as box:
        rows = box.pending()
        assert [r.event_id for r in rows] == ["e0", "e2", "e3", "e4"]
        assert rows[0].payload == f"0:{seqs[0]}".encode()
        assert box.depth == 4
        later = box.append("e5", "t", lambda s: b"x")
        assert later > seqs[-1]  # AUTOINCREMENT: sequence numbers are never reused


def test_outbox_full_evicts_oldest_loudly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with Outbox(tmp_path / "o.sqlite3", max_events=10) as box:
        for i in range(13):
            box.append(f"e{i}", "t", lambda s: b"{}")
        assert box.depth == 10
        assert box.dropped == 3
        assert [r.event_id for r in box.pending(limit=1)] == ["e3"]
    assert sum("evicting the oldest event" in r.message for r in caplog.records) == 3


def test_event_receipts_are_compact_ranges_and_delete_what_they_cover(tmp_path: Path) -> None:
    (receipt,) = EventConfirm.of("door-1", [7, 3, 4, 5, 9, 4])
    assert receipt.seqs == [(3, 5), (7, 7), (9, 9)]
    assert EventConfirm.parse(receipt.to_bytes()) == receipt
    with pytest.raises(PayloadError):
        EventConfirm.parse(b'{"schema_version": 1, "device": "d", "seqs": [[5, 3]], '
                           b'"ts": "2026-01-01T00:00:00Z"}')
    many = EventConfirm.of("door-1", list(range(0, 2 * 2 * MAX_CONFIRM_RANGES, 2)))  # no two adjacent
    assert [len(r.seqs) for r in many] == [MAX_CONFIRM_RANGES, MAX_CONFIRM_RANGES]
    with Outbox(tmp_path / "o.sqlite3") as box:
        seqs = [box.append(f"e{i}", "t", lambda s: b"{}") for i in range(10)]
        assert box.delete_ranges([(seqs[0], seqs[2]), (seqs[5], seqs[5])]) == 4
        assert [r.seq for r in box.pending()] == seqs[3:5] + seqs[6:]
        assert [r.seq for r in box.rows([seqs[1], seqs[4], seqs[9]])] == [seqs[4], seqs[9]]


def test_a_broker_that_drops_a_v5_connect_unanswered_gets_3_1_1() -> None:
    """Some 3.1.1-only brokers close a v5 CONNECT (one with a will, say) without any CONNACK; the client
    then speaks 3.1.1, and later clients of this process start with 3.1.1 for that broker."""
    levels: list[int] = []
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                data = conn.recv(64)
                if len(data) > 8:
                    levels.append(data[8])  # fixed header (2), name length (2), "MQTT" (4), level

    threading.Thread(target=serve, daemon=True).start()
    settings = ClientSettings("127.0.0.1", port, "door-x")
    client = MqttClient(settings, Will("facegate/site/door-x/available", b"offline")).start()
    try:
        assert wait_until(lambda: 4 in levels, progress=lambda: len(levels)), levels
        assert levels[0] == 5 and client.protocol_version == 4
    finally:
        client.close()
    later = MqttClient(settings)
    assert later.protocol_version == 4
    later.close()
    listener.close()
