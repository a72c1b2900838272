"""`facegate bench door`: the JSON contract, and walk-ins really unlock a real agent (no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.door import CONTRACT, FRAME_H, FRAME_W, Sequence, doorway, run_door_bench
from models.runtime.manifest import load_manifest


def test_walk_in_frames_grow_from_the_doorway() -> None:
    photo = (np.arange(250 * 250 * 3) % 251).astype(np.uint8).reshape(250, 250, 3)
    frames = Sequence(photo).frames()
    assert [face for _, face in frames].index(True) > 0  # the doorway comes first
    shown = [f for f, face in frames if face]
    assert all(f is not None and f.shape == (FRAME_H, FRAME_W, 3) for f in shown)
    assert doorway().shape == (FRAME_H, FRAME_W, 3)


def test_bench_door_unlocks_every_walk_in_and_keeps_the_json_contract(built_models: Path,
                                                                       shared_dir: Path) -> None:
    if not load_manifest(built_models).has("minifasnet-2.7"):
        pytest.skip("the models were built without MiniFASNet (../shared/models/minifasnet absent)")
    result = run_door_bench(built_models, shared_dir, sequences=5)
    assert set(CONTRACT) <= set(result)
    details = result["details"]
    assert details["unlocked"] == details["sequences"] == 5
    assert 0 < result["p50_ms"] <= result["p95_ms"] and result["frames_to_decision"] >= 2  # 2-of-3 vote
    assert result["fps"] > 0 and details["vote_floor_ms"] > 0


def test_bench_door_json_prints_exactly_the_contract(built_models: Path, shared_dir: Path) -> None:
    if not load_manifest(built_models).has("minifasnet-2.7"):
        pytest.skip("the models were built without MiniFASNet (../shared/models/minifasnet absent)")
    # a process of its own: the command pins itself to one CPU core
    proc = subprocess.run([str(Path(sys.executable).parent / "facegate"), "bench", "door", "--models-dir",
                           str(built_models), "--shared", str(shared_dir), "--sequences", "5", "--json"],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    body = json.loads(proc.stdout.strip().splitlines()[-1])
    assert tuple(body) == CONTRACT and 0 < body["p50_ms"] <= body["p95_ms"] and body["fps"] > 0
