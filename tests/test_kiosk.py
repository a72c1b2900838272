"""The door screen without a browser: config, the screen's model, and its HTTP server on a real agent."""

from __future__ import annotations

import http.client
import json
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from pydantic import ValidationError

from core.types import DecisionKind, Frame
from device.agent.runner import build_agent
from device.agent.status import LIVENESS_OFF_KEY
from device.config import DeviceConfig, QualityConfig, config_warnings
from device.kiosk.config import KioskConfig, is_loopback
from device.kiosk.preview import encode_preview
from device.kiosk.screen import KioskScreen, Screen
from device.kiosk.server import KioskServer, start_kiosk
from device.liveness.challenge import ChallengeAction, ChallengeState, ChallengeStatus
from tests.agent_support import LIVENESS_OFF, astronaut_frames, wait_until, write_frames
from tests.kiosk_kit import Clock, Reporter, Status, decision, face_frame

STATE_FIELDS = {"state", "message", "person_name", "challenge", "door", "online", "liveness", "ts"}


# ---------------------------------------------------------------------------------------------- config
def test_config_is_off_and_on_loopback_by_default() -> None:
    config = DeviceConfig()
    assert not config.kiosk.enabled and config.kiosk.host == "127.0.0.1" and config.kiosk.loopback
    assert config_warnings(config) == []


def test_config_bounds_and_the_non_loopback_warning() -> None:
    with pytest.raises(ValidationError):
        KioskConfig.model_validate({"preview_fps": 30})  # the preview is capped at 15 fps
    with pytest.raises(ValidationError):
        KioskConfig.model_validate({"colour": "red"})  # unknown keys are errors
    config = DeviceConfig.model_validate({"kiosk": {"enabled": True, "host": "0.0.0.0"}})  # noqa: S104
    assert any("kiosk.host 0.0.0.0 is not loopback" in w for w in config_warnings(config))
    assert [is_loopback(h) for h in ("127.0.0.1", "::1", "localhost", "10.0.0.5", "door.local")] == [
        True, True, True, False, False]


# ---------------------------------------------------------------------------------------------- model
def screen(**kiosk: Any) -> tuple[KioskScreen, Clock, Status, Reporter]:
    clock, status, reporter = Clock(), Status(), Reporter()
    model = KioskScreen(KioskConfig.model_validate(kiosk), QualityConfig(), status, reporter, clock=clock)
    return model, clock, status, reporter


def test_state_has_exactly_the_contract_fields() -> None:
    model, *_ = screen()
    state = model.state().as_dict()
    assert set(state) == STATE_FIELDS
    assert state["state"] == "idle" and state["message"] == "Look at the camera"
    assert state["online"] is None and state["liveness"] == "on" and state["door"] == "locked"
    json.dumps(state)


def test_granted_greets_by_first_name_only_when_names_are_shown() -> None:
    model, clock, *_ = screen(result_hold_s=4.0)
    model.emit(decision(DecisionKind.GRANTED, "Ada King Lovelace"))
    state = model.state()
    assert (state.state, state.message, state.person_name) == (Screen.GRANTED, "Welcome, Ada", "Ada")
    clock.now += 4.1  # the banner goes after result_hold_s
    assert model.state().state is Screen.IDLE
    anonymous, *_ = screen(show_names=False)
    anonymous.emit(decision(DecisionKind.GRANTED, "Ada Lovelace"))
    state = anonymous.state()
    assert (state.message, state.person_name) == ("Welcome", None)


@pytest.mark.parametrize(("kind", "reason", "screen_state", "text"), [
    (DecisionKind.UNKNOWN, "", Screen.UNKNOWN, "Not recognised"),
    (DecisionKind.SPOOF, "", Screen.SPOOF, "Not accepted"),
    (DecisionKind.DENIED, "outside_schedule", Screen.DENIED, "outside your access hours"),
    (DecisionKind.DENIED, "door_fault", Screen.DENIED, "could not open"),
])
def test_other_results_never_name_anyone(kind: DecisionKind, reason: str, screen_state: Screen,
                                         text: str) -> None:
    model, *_ = screen()
    # a spoof of an enrolled person's photo, a denied person: the decision knows the name, the screen drops it
    model.emit(decision(kind, "Ada Lovelace", reason))
    state = model.state()
    assert state.state is screen_state and text in state.message
    assert state.person_name is None and "Ada" not in json.dumps(state.as_dict())


def test_door_fault_puts_no_banner_up_and_the_door_shows_it() -> None:
    model, _, status, _ = screen()
    status.door = "fault"
    model.emit(decision(DecisionKind.DOOR_FAULT))
    state = model.state()
    assert state.state is Screen.IDLE and state.door == "fault"


def test_hints_from_the_quality_gates() -> None:
    model, clock, *_ = screen(dark_level=50)
    model.observe(*face_frame(box=(100, 100, 140, 140)))  # 40 px wide, under [quality] min_face_px 60
    assert (model.state().state, model.state().message) == (Screen.HINT, "Too far: come closer")
    clock.now += 2.0
    model.observe(*face_frame(brightness=20))
    assert model.state().message == "Too dark: face the light"
    clock.now += 2.0
    model.observe(*face_frame(sharp=False))  # a flat chip: sharpness under [quality] min_sharpness
    assert model.state().message == "Hold still"
    clock.now += 2.0
    model.observe(*face_frame(box=(10, 10, 130, 150)))  # the face jumped since the last frame
    assert model.state().message == "Hold still"
    clock.now += 2.0
    model.observe(*face_frame(box=(12, 10, 132, 150)))
    assert model.state().state is Screen.CHECKING
    clock.now += 2.0
    model.observe(Frame(np.zeros((64, 64, 3), np.uint8), clock.now, "test"), [])
    assert model.state().state is Screen.IDLE


def test_challenge_with_countdown_then_the_result() -> None:
    model, clock, _, reporter = screen()
    issued = ChallengeStatus(1, ChallengeAction.TURN_LEFT, ChallengeState.ISSUED, 100.0, 105.0)
    reporter.pending = (issued,)
    model.observe(*face_frame(ts=101.0))
    state = model.state()
    assert state.state is Screen.CHALLENGE and state.message == "Turn your head to your left"
    assert state.challenge == {"action": "turn_left", "prompt": "Turn your head to your left",
                               "remaining_s": 4.0, "timeout_s": 5.0}
    clock.now += 1.0
    challenge = model.state().challenge
    assert challenge is not None and challenge["remaining_s"] == 3.0  # counts down between frames
    reporter.pending = ()  # passed: the engine reports it finished
    model.observe(*face_frame(ts=102.0))
    model.emit(decision(DecisionKind.GRANTED, "Grace Hopper"))
    assert (model.state().state, model.state().message) == (Screen.GRANTED, "Welcome, Grace")
    other = ChallengeStatus(7, ChallengeAction.BLINK, ChallengeState.ISSUED, 100.0, 105.0)
    reporter.pending = (other,)  # another track's challenge is not this face's prompt
    model.observe(*face_frame(ts=102.1))
    assert model.state().state is Screen.GRANTED


def test_badges_liveness_off_offline_and_out_of_service() -> None:
    clock, status = Clock(), Status()
    connected = [True]
    model = KioskScreen(KioskConfig(), QualityConfig(), status, None, lambda: connected[0], clock)
    assert model.state().online is True
    connected[0] = False
    status.warnings = {LIVENESS_OFF_KEY: "liveness off"}
    state = model.state()
    assert state.online is False and state.liveness == "off"
    status.camera = False
    assert model.state().state is Screen.UNAVAILABLE


def test_preview_is_downscaled_and_boxed() -> None:
    rgb = np.full((480, 640, 3), 90, np.uint8)
    data = encode_preview(rgb, ((200, 100, 400, 300),), 320, 70, (0, 255, 0))
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == (240, 320, 3)
    assert image[50, 150, 1] > 200 and image[50, 150, 0] < 60  # the box's edge, scaled by 1/2
    small = encode_preview(np.zeros((100, 120, 3), np.uint8), (), 320, 70, (0, 255, 0))
    assert cv2.imdecode(np.frombuffer(small, np.uint8), cv2.IMREAD_COLOR).shape == (100, 120, 3)  # never up


# ---------------------------------------------------------------------------------------------- HTTP
def _get(server: KioskServer, path: str, host: str | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request("GET", path, headers={"Host": host} if host else {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def _frames(server: KioskServer, seconds: float) -> tuple[list[bytes], float]:
    """JPEG parts of the MJPEG stream read for about ``seconds``, and the span between first and last."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("GET", "/kiosk/preview.mjpg")
    response = conn.getresponse()
    assert response.status == 200
    assert response.getheader("Content-Type") == "multipart/x-mixed-replace; boundary=facegate-frame"
    parts: list[bytes] = []
    times: list[float] = []
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            assert response.fp is not None
            line = response.fp.readline()
            if line.startswith(b"Content-Length:"):
                length = int(line.split(b":")[1])
                response.fp.readline()
                parts.append(response.fp.read(length))
                times.append(time.monotonic())
    finally:
        conn.close()
    return parts, (times[-1] - times[0]) if len(times) > 1 else 0.0


@pytest.fixture()
def agent_with_kiosk(tmp_path: Path, built_models: Path) -> Any:
    frames = write_frames(tmp_path / "frames", astronaut_frames(10))
    config = DeviceConfig.model_validate({
        "device": {"data_dir": str(tmp_path / "data")},
        "models": {"dir": str(built_models)},
        "camera": {"type": "replay", "path": str(frames), "fps": 20.0, "loop": True},
        "liveness": LIVENESS_OFF,
        "kiosk": {"enabled": True, "port": 0, "preview_fps": 5, "preview_width": 200, "max_clients": 1},
    })
    agent = build_agent(config)
    server = start_kiosk(agent)
    assert server is not None
    agent.start()
    try:
        yield agent, server
    finally:
        agent.stop()
        server.close()
        server.close()  # idempotent


def test_http_state_page_and_preview_on_a_real_agent(agent_with_kiosk: Any) -> None:
    agent, server = agent_with_kiosk
    assert wait_until(lambda: agent.status().faces > 0)
    code, headers, body = _get(server, "/kiosk/state")
    state = json.loads(body)
    assert code == 200 and set(state) == STATE_FIELDS and headers["Cache-Control"] == "no-store"
    assert state["liveness"] == "off" and state["online"] is None  # standalone, liveness explicitly off
    code, headers, page = _get(server, "/kiosk")
    assert code == 200 and b'id="message"' in page
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert _get(server, "/kiosk/static/kiosk.js")[0] == 200
    assert _get(server, "/kiosk/static/../config.py")[0] == 404
    parts, span = _frames(server, 3.0)
    assert len(parts) >= 3
    image = cv2.imdecode(np.frombuffer(parts[-1], np.uint8), cv2.IMREAD_COLOR)
    assert image.shape[1] == 200  # 400 px frames, downscaled to preview_width
    # paced to preview_fps (5): a bound on the pacing, never a speed claim
    assert len(parts) - 1 <= 5 * span + 2
    assert server.preview is not None and server.preview.encoded_frames >= len(parts)


def test_http_refuses_foreign_hosts_and_extra_streams(agent_with_kiosk: Any) -> None:
    _, server = agent_with_kiosk
    assert _get(server, "/kiosk/state", host="attacker.example:8088")[0] == 421  # DNS rebinding
    assert _get(server, "/kiosk/state", host=f"localhost:{server.port}")[0] == 200
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("GET", "/kiosk/preview.mjpg")
    assert conn.getresponse().status == 200  # max_clients = 1 ...
    try:
        assert _get(server, "/kiosk/preview.mjpg")[0] == 503  # ... so the second stream is refused
    finally:
        conn.close()


def test_a_taken_port_leaves_the_door_running_without_its_screen(agent_with_kiosk: Any,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    agent, server = agent_with_kiosk
    config = agent.config.model_copy(update={"kiosk": agent.config.kiosk.model_copy(
        update={"port": server.port})})
    other = build_agent(config)
    try:
        assert start_kiosk(other) is None
        assert "door runs without its screen" in caplog.text
    finally:
        other.close()
