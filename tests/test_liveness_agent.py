"""End to end: a printed photo of an enrolled person is reported as ``spoof`` and never opens the door.

The person (NUAA subject 0004) is enrolled from one genuine webcam frame. A replay of their genuine
frames is granted (the control: the face does match), and a replay of photo prints of the same person,
through the real agent with the passive liveness engine, gives ``spoof`` events and no unlock.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from device.agent.runner import build_agent, run_agent
from device.cli import cli as device_cli
from device.config import LivenessConfig, load_device_config
from device.door.base import DoorState
from device.liveness.fusion import FusedLiveness, build_liveness
from device.liveness.passive import PassiveLiveness, find_minifasnet_files
from models.face.image import decode_image
from models.runtime.manifest import load_manifest
from tests.agent_support import no_face_frames, write_config, write_frames

TAU = 0.90  # as in test_agent_e2e: int8 model at FAR 1e-3 from `facegate eval calibrate`
SUBJECT = "0004"
REPEAT = 2


def _nuaa(shared_dir: Path, label: str) -> list[Path]:
    labels = shared_dir / "data" / "liveness-nuaa" / "labels.csv"
    with open(labels, newline="", encoding="utf-8") as handle:
        rows = [r for r in csv.DictReader(handle) if r["label"] == label and r["subject"] == SUBJECT]
    return [labels.parent / r["path"] for r in rows]


def _config(tmp_path: Path, models: Path, name: str) -> Path:
    return write_config(tmp_path / f"{name}.toml", {
        "device": {"id": "door-liveness", "data_dir": str(tmp_path / "data")},
        "models": {"dir": str(models)},
        "camera": {"type": "replay", "path": str(tmp_path / name), "fps": 10.0, "loop": False},
        "door": {"type": "simulated", "unlock_seconds": 5.0},
        "decision": {"tau": TAU, "delta": 0.02, "confirm_k": 2, "confirm_n": 3, "cooldown_s": 600.0,
                     "track_timeout_s": 1.0, "acknowledge_low_tau": True},  # liveness is under test
        # passive alone: its verdicts are under test
        "liveness": {"passive": {"enabled": True}, "challenge": {"mode": "never"}},
        "loop": {"queue_size": 512, "events_jsonl": str(tmp_path / f"{name}.jsonl")},
    })


def _engine(config: LivenessConfig, models: Path, shared_dir: Path) -> FusedLiveness:
    """From the manifest when the build included MiniFASNet, else straight from ../shared."""
    if load_manifest(models).has("minifasnet-2.7"):
        engine = build_liveness(config, models)
        assert isinstance(engine, FusedLiveness)
        return engine
    files = find_minifasnet_files(shared_dir / "models" / "minifasnet")
    passive = config.passive
    return FusedLiveness(config, PassiveLiveness(files, passive.threshold, passive.uncertain_band,
                                                 head=passive.head))


def _run(config_path: Path, models: Path, shared_dir: Path) -> tuple[list[dict[str, Any]], list[DoorState]]:
    config = load_device_config(config_path)
    engine = _engine(config.liveness, models, shared_dir)
    agent = build_agent(config, liveness=engine)
    door = agent.door
    assert run_agent(config, agent) == 0
    engine.close()
    events_file = Path(config.loop.events_jsonl or "")
    lines = events_file.read_text().splitlines() if events_file.is_file() else []
    events = [json.loads(line) for line in lines]
    return events, [t.state for t in door.transitions]


def _summary(events: list[dict[str, Any]]) -> str:
    return json.dumps([(e["kind"], e["person_id"], e["score"]) for e in events])


def test_printed_photo_is_spoof_and_never_unlocks(tmp_path: Path, shared_dir: Path,
                                                   built_models: Path) -> None:
    genuine, attack = _nuaa(shared_dir, "genuine"), _nuaa(shared_dir, "attack")
    enroll_cfg = _config(tmp_path, built_models, "genuine")
    runner = CliRunner()
    enrolled = None
    for photo in genuine[:10]:
        result = runner.invoke(device_cli, ["enroll", "--config", str(enroll_cfg), "--person-id", "A",
                                            "--name", "Person A", str(photo)])
        if result.exit_code == 0:
            enrolled = photo
            break
    assert enrolled is not None, "no genuine NUAA frame passed the enrollment gates"

    control = [decode_image(p.read_bytes()) for p in genuine[10:16]]
    write_frames(tmp_path / "genuine", no_face_frames(2) + [f for f in control for _ in range(REPEAT)]
                 + no_face_frames(2))
    events, _ = _run(enroll_cfg, built_models, shared_dir)
    assert ("granted", "A") in [(e["kind"], e["person_id"]) for e in events], events
    assert all(e["liveness"]["verdict"] != "spoof" for e in events)
    print("liveness e2e genuine events:", _summary(events))

    prints = [decode_image(p.read_bytes()) for p in attack[:8]]
    write_frames(tmp_path / "attack", no_face_frames(2) + [f for f in prints for _ in range(REPEAT)]
                 + no_face_frames(2))
    events, door_states = _run(_config(tmp_path, built_models, "attack"), built_models, shared_dir)
    kinds = [e["kind"] for e in events]
    assert "spoof" in kinds and "granted" not in kinds, events
    assert DoorState.UNLOCKED not in door_states, door_states
    spoof = next(e for e in events if e["kind"] == "spoof")
    passive = next(c for c in spoof["liveness"]["checks"] if c["name"] == "passive")
    assert passive["verdict"] == "spoof" and passive["score"] < LivenessConfig().passive.threshold
    # the prints match A above tau: without liveness this replay would have opened the door
    assert all(e["person_id"] == "A" for e in events), events
    print("liveness e2e attack events:", _summary(events))
