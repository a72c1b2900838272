"""The frame loop with the real int8 pipeline: camera failure, shutdown, queue, reload, status."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from skimage import data

from core.types import DecisionKind, Frame
from device.agent import Agent, JsonLinesSink, MemorySink
from device.agent.runner import build_agent, open_gallery, open_pipeline
from device.config import DeviceConfig
from device.door import DoorState
from device.enroll import enroll
from tests.agent_support import (
    LIVENESS_OFF,
    astronaut_frames,
    no_face_frames,
    save_rgb,
    wait_until,
    write_config,
    write_frames,
)

REPO = Path(__file__).resolve().parents[1]


def make_config(tmp_path: Path, models: Path, frames: Path, **overrides: dict[str, Any]) -> DeviceConfig:
    sections: dict[str, dict[str, Any]] = {
        "device": {"data_dir": str(tmp_path / "data")},
        "models": {"dir": str(models)},
        "camera": {"type": "replay", "path": str(frames), "fps": 10.0, "loop": True},
        "door": {"type": "simulated", "unlock_seconds": 300.0},
        "decision": {"cooldown_s": 3600.0, "track_timeout_s": 5.0},
        "loop": {"queue_size": 64},
        "liveness": dict(LIVENESS_OFF),
    }
    for name, values in overrides.items():
        sections.setdefault(name, {}).update(values)
    return DeviceConfig.model_validate(sections)


def enroll_astronaut(config: DeviceConfig, tmp_path: Path) -> None:
    photo = save_rgb(tmp_path / "enroll" / "astronaut.png", data.astronaut())
    with open_pipeline(config) as pipeline, open_gallery(config, pipeline) as gallery:
        outcomes = enroll(config, pipeline, gallery, "astro", "Astronaut", [photo])
    assert outcomes[0].accepted, outcomes[0].as_dict()


def test_camera_failure_keeps_the_door_locked_and_the_agent_recovers(tmp_path: Path,
                                                                     built_models: Path) -> None:
    frames = write_frames(tmp_path / "frames", astronaut_frames(6))
    config = make_config(tmp_path, built_models, frames)
    enroll_astronaut(config, tmp_path)
    sink = MemorySink()
    with build_agent(config, sinks=[sink]) as agent:
        assert agent.door.state is DoorState.LOCKED
        agent.start()
        assert wait_until(lambda: agent.status().decisions.get("granted", 0) == 1)
        assert agent.door.state is DoorState.UNLOCKED  # 300 s window

        shutil.move(frames, tmp_path / "unplugged")  # the replay source now raises
        assert wait_until(lambda: agent.status().camera_errors >= 3)
        status = agent.status()
        assert not status.camera_connected and status.running
        assert agent.door.state is DoorState.LOCKED
        assert [t.reason for t in agent.door.transitions][-1] == "camera lost"
        assert all(t.state is DoorState.LOCKED for t in agent.door.transitions[2:])

        captured = status.frames_captured
        shutil.move(tmp_path / "unplugged", frames)
        assert wait_until(lambda: agent.status().frames_captured >= captured + 5)
        status = agent.status()
        assert status.camera_connected and status.processing_errors == 0
        assert status.decisions == {"granted": 1}  # same person again: inside the cooldown
        assert agent.door.state is DoorState.LOCKED
    assert [d.kind for d in sink.decisions] == [DecisionKind.GRANTED]
    assert sink.closed and agent.door.state is DoorState.LOCKED


def test_stop_ends_both_threads_and_locks(tmp_path: Path, built_models: Path) -> None:
    frames = write_frames(tmp_path / "frames", no_face_frames(3))
    config = make_config(tmp_path, built_models, frames, camera={"fps": 30.0})
    agent = build_agent(config, sinks=[])
    agent.start()
    assert wait_until(lambda: agent.status().frames_processed >= 3)
    agent.manual_unlock(60)
    assert agent.door.state is DoorState.UNLOCKED
    agent.stop()
    assert not any(t.is_alive() for t in agent._threads)
    assert agent.door.state is DoorState.LOCKED and not agent.status().running
    agent.stop()  # idempotent


def test_sigterm_shuts_the_cli_agent_down_cleanly(tmp_path: Path, built_models: Path) -> None:
    frames = write_frames(tmp_path / "frames", no_face_frames(3))
    events = tmp_path / "events.jsonl"
    cfg = write_config(tmp_path / "device.toml", {
        "device": {"data_dir": str(tmp_path / "data")},
        "models": {"dir": str(built_models)},
        "camera": {"type": "replay", "path": str(frames), "fps": 20.0, "loop": True},
        "loop": {"events_jsonl": str(events)},
    })
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    facegate = str(Path(sys.executable).parent / "facegate")
    proc = subprocess.Popen([facegate, "device", "run", "--config", str(cfg)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines: list[str] = []
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if "started" in line and "agent" in line:
                break
        assert proc.poll() is None, "".join(lines)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        print(f"SIGTERM -> exit took {time.monotonic() - sent:.2f} s")  # reported, not asserted
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "signal SIGTERM" in err and "door locked (exit)" in err


def test_queue_drops_oldest_or_newest_and_counts(tmp_path: Path, built_models: Path) -> None:
    frames = write_frames(tmp_path / "frames", no_face_frames(1))
    for policy, kept in (("oldest", [3, 4]), ("newest", [0, 1])):
        config = make_config(tmp_path, built_models, frames, loop={"queue_size": 2, "drop": policy})
        agent = build_agent(config, sinks=[])
        rgb = no_face_frames(1)[0]
        for i in range(5):
            agent._enqueue(Frame(rgb, float(i), "test", i))
        assert agent.status().queue_drops == 3
        assert [agent._queue.get_nowait().index for _ in range(2)] == kept
        agent.close()


def test_bad_frames_are_counted_and_skipped(tmp_path: Path, built_models: Path) -> None:
    frames = write_frames(tmp_path / "frames", no_face_frames(2))
    (frames / "0001a.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    config = make_config(tmp_path, built_models, frames, camera={"loop": False, "fps": 50.0})
    sink = MemorySink()
    agent = build_agent(config, sinks=[sink])
    agent.start()
    assert agent.wait(timeout=120)  # a finite replay ends the loop
    status = agent.status()
    agent.stop()
    assert status.bad_frames == 1 and status.frames_processed == 2 and status.processing_errors == 0
    assert sink.decisions == [] and status.faces == 0


def test_reload_swaps_gallery_and_status_reports_versions(tmp_path: Path, built_models: Path) -> None:
    frames = write_frames(tmp_path / "frames", no_face_frames(1))
    config = make_config(tmp_path, built_models, frames)
    jsonl = tmp_path / "events.jsonl"
    agent = build_agent(config, sinks=[JsonLinesSink(jsonl)])
    before = agent.status()
    assert before.gallery_persons == 0 and len(before.model_sha256) == 64
    enroll_astronaut(config, tmp_path)  # written to disk beside the running agent
    new_version = agent.reload()
    after = agent.status()
    assert after.gallery_version == new_version != before.gallery_version
    assert after.gallery_persons == 1 and after.model_sha256 == before.model_sha256
    json.dumps(after.as_dict())  # JSON-safe for the status topic
    agent.close()


def test_agent_refuses_a_gallery_for_another_model(tmp_path: Path, built_models: Path) -> None:
    from device.agent import AgentError, Models
    from device.gallery import Gallery

    frames = write_frames(tmp_path / "frames", no_face_frames(1))
    config = make_config(tmp_path, built_models, frames)
    pipeline = open_pipeline(config)
    stranger = Gallery.create(tmp_path / "g", 128, "f" * 64, config.gallery)
    from device.camera import create_source
    from device.door import SimulatedDoor

    with SimulatedDoor() as door, pytest.raises(AgentError, match="sha256"):
        Agent(config, models=Models(pipeline, stranger), door=door, source=create_source(config.camera))
    pipeline.close()


def test_standalone_door_picks_up_a_local_enrollment_without_restart(tmp_path: Path,
                                                                     built_models: Path) -> None:
    frames = write_frames(tmp_path / "frames", astronaut_frames(6))
    config = make_config(tmp_path, built_models, frames)
    sink = MemorySink()
    with build_agent(config, sinks=[sink]) as agent:
        agent.start()
        assert wait_until(lambda: agent.status().decisions.get("unknown", 0) == 1)  # empty gallery
        assert agent.door.state is DoorState.LOCKED
        enroll_astronaut(config, tmp_path)  # `facegate device enroll` while the door runs
        assert wait_until(lambda: agent.status().decisions.get("granted", 0) == 1)
        assert agent.status().gallery_persons == 1
    kinds = [(d.kind, d.person_id) for d in sink.decisions]
    assert kinds == [(DecisionKind.UNKNOWN, None), (DecisionKind.GRANTED, "astro")]
