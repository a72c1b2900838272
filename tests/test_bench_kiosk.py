"""`facegate bench kiosk`: the JSON contract; the kiosk arm streams to its screen (no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.kiosk import CONTRACT


def test_bench_kiosk_json_prints_exactly_the_contract(built_models: Path) -> None:
    # a process of its own: the command pins itself to one CPU core
    proc = subprocess.run([str(Path(sys.executable).parent / "facegate"), "bench", "kiosk", "--models-dir",
                           str(built_models), "--sequences", "1", "--repeats", "1", "--json"],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    body = json.loads(proc.stdout.strip().splitlines()[-1])
    assert tuple(body) == CONTRACT
    # both arms did the work, and the screen got a preview: figures exist, their size is the bench's to report
    assert body["ratio"] > 0 and body["baseline_cpu_ms_per_frame"] > 0 and body["kiosk_cpu_ms_per_frame"] > 0
    assert body["preview_fps"] > 0
