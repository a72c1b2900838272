"""``facegate demo`` as CI and a newcomer run it: a subprocess with a real broker (mosquitto when installed),
the real server and door, judged on its ``--json-summary``.

With ../shared: CelebA faces, and the printed-photo scene with passive liveness. Without it (a fresh
clone): the packaged faces, the printed-photo scene skipped with its reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO

# Only so that a hung demo fails the test instead of the whole run; never a performance claim.
DEMO_TIMEOUT_S = 600
pytestmark = pytest.mark.broker  # the demo starts its own broker (FACEGATE_BROKER picks which)


def _run_demo(tmp_path: Path, screenshots: str, **env: str) -> tuple[dict[str, Any], str]:
    summary = tmp_path / "summary.json"
    facegate = str(Path(sys.executable).parent / "facegate")
    args = [facegate, "demo", "--json-summary", str(summary), "--keep-data", str(tmp_path / "work"),
            "--screenshots", screenshots]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=DEMO_TIMEOUT_S, cwd=REPO,
                          env={**os.environ, **env})
    output = proc.stdout + proc.stderr
    assert summary.is_file(), output[-6000:]
    result: dict[str, Any] = json.loads(summary.read_text())
    assert proc.returncode == (0 if result["passed"] else 1), output[-6000:]
    print(proc.stdout)  # the event lines and the summary table, for the CI log
    return result, output


def _check_common(result: dict[str, Any], output: str) -> dict[str, dict[str, Any]]:
    """Every step passed; granted names the enrolled person; stranger unknown; deleted person not granted."""
    assert result["passed"] and not result["error"], output[-6000:]
    steps = {s["name"]: s for s in result["steps"]}
    assert all(s["passed"] for s in steps.values()), json.dumps(result["steps"], indent=1)
    granted = steps["enrolled person"]
    assert granted["observed"] == "granted" and granted["door_opened"]
    assert granted["person_id"] is not None and granted["person_id"] == granted["expected_person_id"]
    stranger = steps["stranger"]
    assert stranger["observed"] == "unknown" and stranger["person_id"] is None
    assert "granted" not in stranger["events"] and not stranger["door_opened"]
    deleted = steps["deleted person"]
    assert deleted["observed"] == "unknown" and "granted" not in deleted["events"]
    assert not deleted["door_opened"]
    assert "confirmed" in deleted["note"]
    assert any(line.startswith("demo: PASS") for line in output.splitlines())
    _check_kiosk(result["kiosk"], {"granted", "unknown"})
    return steps


def _browser() -> bool:
    """Whether headless Chromium can take the demo's screenshots here (CI: always)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return False
    return bool(shutil.which("chromedriver")) and any(
        shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome"))


def _check_kiosk(kiosk: dict[str, Any], reached: set[str]) -> None:
    """The demo served the door screen; it showed what the scenes reached, one screenshot per state."""
    assert kiosk["url"].startswith("http://127.0.0.1:") and kiosk["url"].endswith("/kiosk")
    assert reached <= set(kiosk["states_seen"]), kiosk
    if not _browser():
        assert "no screenshots" in kiosk["screenshots_skipped"] and kiosk["screenshots"] == []
        return
    assert len(kiosk["screenshots"]) == len(kiosk["states_seen"]), kiosk
    for state, shot in zip(kiosk["states_seen"], kiosk["screenshots"], strict=True):
        path = REPO / shot
        assert path.name.endswith(f"-{state}.png") and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_demo_with_shared_data(tmp_path: Path, shared_dir: Path, built_models: Path) -> None:
    result, output = _run_demo(tmp_path, "artifacts/screenshots/demo")
    steps = _check_common(result, output)
    assert "CelebA" in result["image_set"]
    assert "spoof" in result["kiosk"]["states_seen"]
    assert result["broker"] == ("mosquitto" if "mosquitto on" in output else "amqtt")
    # conftest's built_models includes MiniFASNet from ../shared, so the printed-photo scene runs
    spoof = steps["printed photo"]
    assert spoof["observed"] == "spoof" and "granted" not in spoof["events"] and not spoof["door_opened"]
    assert result["skipped"] == []
    assert result["liveness"] == "passive (MiniFASNet)"


@pytest.mark.slow
def test_demo_on_a_fresh_clone_uses_packaged_faces(tmp_path: Path, built_models: Path) -> None:
    result, output = _run_demo(tmp_path, "artifacts/screenshots/demo-packaged",
                               FACEGATE_SHARED=str(tmp_path / "no-shared"))
    steps = _check_common(result, output)
    assert "packaged" in result["image_set"] and result["notes"]
    assert "printed photo" not in steps
    assert [s["name"] for s in result["skipped"]] == ["printed photo"]
    assert "absent" in result["skipped"][0]["reason"]
    # still photos cannot take a challenge: the door runs without liveness, on purpose and visibly
    assert result["liveness"].startswith("liveness off")
    assert "liveness off" in output and "required = false" in output
