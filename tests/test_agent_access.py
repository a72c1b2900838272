"""The [access] policy in the real agent: the enrolled astronaut on a replay through the built int8 models
is granted inside the schedule, denied (door never unlocked, person and reason in the event) outside it
or when blocked."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from skimage import data

from core.protocol.schemas import EventPayload, decision_to_event
from core.types import DecisionKind
from device.agent import MemorySink
from device.agent.runner import build_agent, open_gallery, open_pipeline
from device.config import WEEKDAYS, DeviceConfig
from device.door import DoorState
from device.enroll import enroll
from tests.agent_support import LIVENESS_OFF, WAIT_S, astronaut_frames, no_face_frames, save_rgb, write_frames

ALL_DAY = {"start": "00:00", "end": "24:00"}


def _days_around_now() -> list[str]:
    """Today and tomorrow (UTC): a test that runs across midnight still sees one of them."""
    now = datetime.now(UTC)
    return [WEEKDAYS[now.weekday()], WEEKDAYS[(now + timedelta(days=1)).weekday()]]


def _access(case: str) -> dict[str, Any]:
    near = _days_around_now()
    if case == "inside":
        return {"timezone": "UTC", "schedule": [{"days": near, **ALL_DAY}]}
    if case == "outside":  # every day but today and tomorrow: "now" is never inside
        return {"timezone": "UTC", "schedule": [{"days": [d for d in WEEKDAYS if d not in near], **ALL_DAY}]}
    return {"blocked": ["astro"], "always_allowed": ["someone-else"]}


@pytest.mark.parametrize(("case", "kind", "reason"), [
    ("inside", DecisionKind.GRANTED, None),
    ("outside", DecisionKind.DENIED, "outside_schedule"),
    ("blocked", DecisionKind.DENIED, "blocked"),
])
def test_schedule_and_block_list_in_the_agent(tmp_path: Path, built_models: Path, case: str,
                                              kind: DecisionKind, reason: str | None) -> None:
    frames = write_frames(tmp_path / "frames", no_face_frames(2) + astronaut_frames(8) + no_face_frames(2))
    config = DeviceConfig.model_validate({
        "device": {"id": "door-a", "data_dir": str(tmp_path / "data")},
        "models": {"dir": str(built_models)},
        "camera": {"type": "replay", "path": str(frames), "fps": 10.0, "loop": False},
        "door": {"type": "simulated", "unlock_seconds": 300.0},
        "decision": {"cooldown_s": 3600.0, "track_timeout_s": 5.0},
        "loop": {"queue_size": 64},
        "liveness": LIVENESS_OFF,
        "access": _access(case),
    })
    photo = save_rgb(tmp_path / "enroll" / "astronaut.png", data.astronaut())
    with open_pipeline(config) as pipeline, open_gallery(config, pipeline) as gallery:
        assert enroll(config, pipeline, gallery, "astro", "Astronaut", [photo])[0].accepted

    sink = MemorySink()
    with build_agent(config, sinks=[sink]) as agent:
        agent.start()
        assert agent.wait(WAIT_S)
        unlocked = [t for t in agent.door.transitions if t.state is DoorState.UNLOCKED]
        status = agent.status()

    (decision,) = sink.decisions  # one walk-through, one event
    assert (decision.kind, decision.person_id, decision.name) == (kind, "astro", "Astronaut")
    assert (decision.reason or None) == reason
    assert status.decisions == {kind.value: 1}
    if kind is DecisionKind.GRANTED:
        assert [t.reason for t in unlocked] == ["granted astro"]
    else:
        assert unlocked == []  # the door never opened
    event = EventPayload.parse(decision_to_event(decision, "door-a").to_bytes())
    assert (event.decision, event.person_id, event.reason, event.snapshot) == (kind, "astro", reason, False)
