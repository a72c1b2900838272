"""Event sinks: JSON lines on disk, fan-out that survives a failing sink, no biometric data in events."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.types import Decision, DecisionKind, LivenessCheck, LivenessResult, LivenessVerdict
from device.agent import FanOutSink, JsonLinesSink, MemorySink, decision_record

DECISION = Decision(
    kind=DecisionKind.GRANTED, person_id="p1", name="Ada", score=0.93, margin=0.21,
    liveness=LivenessResult(LivenessVerdict.LIVE, (LivenessCheck("passive", 0.97, LivenessVerdict.LIVE),)),
    latencies_ms={"detect": 4.123, "embed": 20.5}, model_version="dlib-int8", gallery_version="3-abc",
    timestamp=1.7e9, source_id="replay:x",
)


class BrokenSink:
    def emit(self, decision: Decision) -> None:
        raise ConnectionError("broker down")

    def close(self) -> None:
        raise ConnectionError("still down")


def test_jsonl_sink_appends_one_object_per_line(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "events.jsonl"
    with JsonLinesSink(path) as sink:
        sink.emit(DECISION)
        sink.emit(DECISION)
    sink.close()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(lines) == 2 and lines[0] == decision_record(DECISION)
    assert lines[0]["kind"] == "granted" and lines[0]["liveness"]["checks"][0]["name"] == "passive"
    assert set(lines[0]) == {"kind", "person_id", "name", "score", "margin", "liveness", "latencies_ms",
                             "model_version", "gallery_version", "timestamp", "source_id", "reason"}
    assert lines[0]["reason"] is None  # set only for denied decisions
    with pytest.raises(ValueError, match="closed"):
        sink.emit(DECISION)


def test_fan_out_keeps_delivering_when_one_sink_fails() -> None:
    memory = MemorySink()
    fan = FanOutSink(BrokenSink())
    fan.add(memory)
    fan.emit(DECISION)
    assert memory.decisions == [DECISION]
    fan.close()
    assert memory.closed
