"""End to end through the real int8 model: enroll A from one photo, replay A, a stranger and empty frames.

Expected events: ``granted`` for A (once: k-of-n, then cooldown), ``unknown`` for the stranger, nothing
for frames without a face. The CelebA variant needs ../shared; the astronaut variant runs without it.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from click.testing import CliRunner
from skimage import data

from device.agent.runner import run_agent
from device.cli import cli as device_cli
from device.config import load_device_config
from device.decide.operating_point import operating_point
from tests.agent_support import (
    LIVENESS_OFF,
    astronaut_frames,
    no_face_frames,
    save_rgb,
    stranger_frames,
    write_config,
    write_frames,
)

# The door's calibrated open-set operating point for one person (`facegate eval calibrate --open-set`).
POINT = operating_point(1)
REPEAT = 2  # each photo is shown for two frames, as a camera sees a person for a while
GAP_FRAMES = 20  # 2 s without a face at 10 fps ends the track (timeout 1 s)


def _config(tmp_path: Path, models: Path, frames: Path) -> Path:
    return write_config(tmp_path / "device.toml", {
        "device": {"id": "door-e2e", "data_dir": str(tmp_path / "data")},
        "models": {"dir": str(models)},
        "camera": {"type": "replay", "path": str(frames), "fps": 10.0, "loop": False},
        "door": {"type": "simulated", "unlock_seconds": 5.0},
        "decision": {"tau": POINT.tau, "delta": POINT.delta, "confirm_k": 2, "confirm_n": 3,
                     "cooldown_s": 600.0, "track_timeout_s": 1.0},
        "loop": {"queue_size": 512, "events_jsonl": str(tmp_path / "events.jsonl")},
        "liveness": LIVENESS_OFF,
    })


def _enroll_first_accepted(config: Path, person: str, photos: list[Path]) -> Path:
    """Run `facegate device enroll` on A's photos one at a time until one passes the gates."""
    runner = CliRunner()
    for photo in photos:
        result = runner.invoke(device_cli, ["enroll", "--config", str(config), "--person-id", person,
                                            "--name", f"Person {person}", str(photo)])
        summary = json.loads(result.stdout.strip().splitlines()[-1])
        if result.exit_code == 0:
            assert summary["accepted"] and summary["failures"] == []
            return photo
        assert result.exit_code == 1 and not summary["accepted"]
    raise AssertionError(f"none of {len(photos)} photos of {person} passed the enrollment gates")


def _run(config: Path) -> list[dict[str, Any]]:
    assert run_agent(load_device_config(config)) == 0
    events = Path(load_device_config(config).loop.events_jsonl or "")
    return [json.loads(line) for line in events.read_text().splitlines()] if events.is_file() else []


def _read(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def test_celeba_person_granted_stranger_unknown_empty_frames_silent(tmp_path: Path, shared_dir: Path,
                                                                   built_models: Path) -> None:
    root = shared_dir / "data" / "celeba-faces"
    by_id: dict[str, list[Path]] = {}
    with open(root / "identities.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            by_id.setdefault(row["identity"], []).append(root / row["path"])
    a_id, b_id = [pid for pid, paths in sorted(by_id.items()) if len(paths) >= 10][:2]
    config = _config(tmp_path, built_models, tmp_path / "frames")
    enrolled = _enroll_first_accepted(config, "A", by_id[a_id][:5])
    a_frames = [_read(p) for p in by_id[a_id] if p != enrolled][:6]
    b_frames = [_read(p) for p in by_id[b_id][:6]]
    frames = (no_face_frames(4) + [f for f in a_frames for _ in range(REPEAT)] + no_face_frames(GAP_FRAMES)
              + [f for f in b_frames for _ in range(REPEAT)] + no_face_frames(4))
    write_frames(tmp_path / "frames", frames)

    events = _run(config)
    assert [(e["kind"], e["person_id"]) for e in events] == [("granted", "A"), ("unknown", None)], events
    granted, unknown = events
    assert granted["score"] >= POINT.tau and granted["margin"] >= POINT.delta
    assert granted["name"] == "Person A"
    assert unknown["score"] < POINT.tau
    for event in events:
        assert event["liveness"]["verdict"] == "skipped"
        assert {"detect", "align", "embed", "liveness", "search", "decide"} <= set(event["latencies_ms"])
        assert event["model_version"] and event["gallery_version"].startswith("1-")
    print("e2e celeba events:", json.dumps([{k: e[k] for k in ("kind", "person_id", "score", "margin")}
                                             for e in events]))


def test_astronaut_granted_stranger_unknown_without_shared(tmp_path: Path, built_models: Path) -> None:
    photo = save_rgb(tmp_path / "enroll" / "astronaut.png", data.astronaut())
    config = _config(tmp_path, built_models, tmp_path / "frames")
    _enroll_first_accepted(config, "astro", [photo])
    frames = (no_face_frames(4) + astronaut_frames(8) + no_face_frames(GAP_FRAMES) + stranger_frames(6)
              + no_face_frames(4))
    write_frames(tmp_path / "frames", frames)
    events = _run(config)
    assert [(e["kind"], e["person_id"]) for e in events] == [("granted", "astro"), ("unknown", None)], events
    print("e2e astronaut events:", json.dumps([{k: e[k] for k in ("kind", "person_id", "score", "margin")}
                                                for e in events]))
