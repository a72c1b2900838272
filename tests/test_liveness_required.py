"""Secure by default: liveness is required and the decision threshold has no permissive default.

- A config with no liveness check does not validate (the error names ``[liveness]``) unless
  ``required = false``; such a door then says "liveness off" on its status topic, metrics, ``doctor`` and
  Home Assistant (the kiosk reads the same status).
- A config without ``tau`` gets the calibrated default; a ``tau`` below the calibrated floor for the live
  gallery's size is refused at start and at reload unless acknowledged, and then shown the same way.
  Proven with one enrollee and a stranger, on the project's built models.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from jinja2.sandbox import ImmutableSandboxedEnvironment
from pydantic import ValidationError
from skimage import data

import device.decide.operating_point as op
from core.protocol.topics import Topics
from core.types import DecisionKind
from device.agent import MemorySink
from device.agent.loop import Agent, AgentError, Models
from device.agent.runner import build_agent, open_gallery, open_pipeline
from device.camera import create_source
from device.config import DecisionConfig, DeviceConfig
from device.doctor import Status, run_checks
from device.door import SimulatedDoor
from device.enroll import enroll
from device.liveness.base import LIVENESS_OFF
from device.metrics import DeviceMetrics
from device.mqtt.homeassistant import discovery_configs
from device.mqtt.service import DeviceMqtt
from device.vision.embedder import EMBEDDING_DIM
from facegate.cli import main
from models.runtime.manifest import load_manifest
from tests.agent_support import (
    LIVENESS_OFF as LIVENESS_OFF_CONFIG,
)
from tests.agent_support import (
    astronaut_frames,
    no_face_frames,
    save_rgb,
    stranger_frames,
    write_frames,
)

NO_CHECK = '[liveness.passive]\nenabled = false\n[liveness.challenge]\nmode = "never"\n[liveness]\n'


def test_liveness_required_validate_config_refuses_a_door_without_any_check(tmp_path: Path) -> None:
    config = tmp_path / "no-liveness.toml"
    config.write_text(NO_CHECK, encoding="utf-8")
    result = CliRunner().invoke(main, ["device", "run", "--validate-config", "--config", str(config)])
    print(f"--validate-config without liveness: exit {result.exit_code}\n{result.output}")
    assert result.exit_code == 1
    assert "liveness: " in result.output and "[liveness] has no check enabled" in result.output
    assert "required = false" in result.output  # says how to run without it, on purpose

    config.write_text(NO_CHECK + "required = false\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["device", "run", "--validate-config", "--config", str(config)])
    print(f"--validate-config with required = false: exit {result.exit_code}\n{result.output}")
    assert result.exit_code == 0 and "config OK" in result.stdout
    assert "warning: liveness off" in result.stderr


def test_liveness_required_defaults_are_secure() -> None:
    config = DeviceConfig()
    assert config.liveness.required and config.liveness.passive.enabled
    assert config.liveness.challenge.mode == "uncertain"
    assert config.decision.tau == op.DEFAULT_TAU and config.decision.delta == op.DEFAULT_DELTA
    with pytest.raises(ValidationError, match="uncertain_as"):
        DeviceConfig.model_validate({"liveness": {"uncertain_as": "live"}})


def test_liveness_required_agent_without_an_engine_does_not_start(tmp_path: Path, built_models: Path) -> None:
    frames = write_frames(tmp_path / "frames", no_face_frames(1))
    config = DeviceConfig.model_validate({
        "device": {"data_dir": str(tmp_path / "data")}, "models": {"dir": str(built_models)},
        "camera": {"type": "replay", "path": str(frames)}})
    with open_pipeline(config) as pipeline, open_gallery(config, pipeline) as gallery:
        with SimulatedDoor() as door, pytest.raises(AgentError, match=r"\[liveness\] is required"):
            Agent(config, models=Models(pipeline, gallery), door=door, source=create_source(config.camera))


def _render(template: str, payload: dict[str, Any]) -> str:
    """A Home Assistant value_template rendered against a JSON payload, as HA renders it."""
    return ImmutableSandboxedEnvironment().from_string(template).render(value_json=payload)


def test_liveness_required_false_shows_liveness_off_everywhere(tmp_path: Path, built_models: Path) -> None:
    frames = write_frames(tmp_path / "frames", no_face_frames(2))
    config = DeviceConfig.model_validate({
        "device": {"id": "door-off", "site": "hq", "data_dir": str(tmp_path / "data")},
        "models": {"dir": str(built_models)},
        "camera": {"type": "replay", "path": str(frames), "fps": 5.0, "loop": True},
        "liveness": LIVENESS_OFF_CONFIG,
    })
    with build_agent(config, sinks=[]) as agent:
        status = agent.status()
        assert status.liveness == LIVENESS_OFF and status.warnings == {"liveness_off": LIVENESS_OFF}
        assert status.as_dict()["warnings"] == [LIVENESS_OFF]  # what the kiosk and the status topic read

        mqtt = DeviceMqtt(config, agent)  # its retained status topic, built without a broker
        try:
            payload = mqtt.status_payload()
        finally:
            mqtt.close()
        assert payload.liveness == LIVENESS_OFF and payload.warnings == [LIVENESS_OFF]
        wire = json.loads(payload.to_bytes())
        sensors = {c["name"]: c for _, c in discovery_configs(Topics("facegate", "hq"), "door-off", "0")}
        assert _render(sensors["Liveness"]["value_template"], wire) == LIVENESS_OFF
        assert _render(sensors["Security warnings"]["value_template"], wire) == LIVENESS_OFF

        metrics = DeviceMetrics()
        metrics.observe_agent(agent)
        text = metrics.scrape().decode()
        assert 'facegate_device_unsafe_setting{setting="liveness_off"} 1.0' in text
        assert 'facegate_device_unsafe_setting{setting="low_tau"} 0.0' in text
        assert 'facegate_device_liveness_info{mode="liveness off"} 1.0' in text

    row = next(r for r in run_checks(config) if r.name == "liveness")
    assert row.status is Status.WARN and LIVENESS_OFF in row.detail


def test_liveness_required_default_door_runs_a_check_and_says_which(tmp_path: Path,
                                                                    built_models: Path) -> None:
    frames = write_frames(tmp_path / "frames", no_face_frames(1))
    config = DeviceConfig.model_validate({
        "device": {"data_dir": str(tmp_path / "data")}, "models": {"dir": str(built_models)},
        "camera": {"type": "replay", "path": str(frames)}})
    with build_agent(config, sinks=[]) as agent:
        status = agent.status()
        # passive when the models folder has MiniFASNet, else the challenge on every face: never no check
        assert status.liveness in ("passive + challenge on uncertain",
                                   "challenge on every face (passive models missing)")
        assert status.warnings == {}
    row = next(r for r in run_checks(config) if r.name == "liveness")
    assert row.status in (Status.OK, Status.WARN) and LIVENESS_OFF not in row.detail


# ----------------------------------------------------------------------------- the decision threshold


def _door(tmp_path: Path, models: Path, frames: Path, **decision: Any) -> DeviceConfig:
    """A standalone door, liveness explicitly off so that only the threshold decides."""
    return DeviceConfig.model_validate({
        "device": {"id": "door-tau", "data_dir": str(tmp_path / "data")},
        "models": {"dir": str(models)},
        "camera": {"type": "replay", "path": str(frames), "fps": 10.0, "loop": False},
        "door": {"type": "simulated", "unlock_seconds": 1.0},
        "decision": {"confirm_k": 2, "confirm_n": 3, "cooldown_s": 600.0, "track_timeout_s": 1.0, **decision},
        "loop": {"queue_size": 512},
        "liveness": LIVENESS_OFF_CONFIG,
    })


def _one_enrollee(config: DeviceConfig, tmp_path: Path) -> None:
    photo = save_rgb(tmp_path / "enroll" / "astronaut.png", data.astronaut())
    with open_pipeline(config) as pipeline, open_gallery(config, pipeline) as gallery:
        assert enroll(config, pipeline, gallery, "astro", "Astronaut", [photo])[0].accepted
        assert gallery.person_count == 1


def _stranger_then_enrollee(tmp_path: Path) -> Path:
    """The stranger walks up, leaves (20 empty frames end the track), then the enrollee comes."""
    return write_frames(tmp_path / "frames", no_face_frames(1) + stranger_frames(6) + no_face_frames(20)
                        + astronaut_frames(6) + no_face_frames(1))


def _run(config: DeviceConfig) -> tuple[list[tuple[DecisionKind, str | None]], Agent]:
    sink = MemorySink()
    with build_agent(config, sinks=[sink]) as agent:
        agent.start()
        assert agent.wait(120)
        return [(d.kind, d.person_id) for d in sink.decisions], agent


def test_calibrated_tau_default_keeps_a_stranger_out_with_one_enrollee(tmp_path: Path,
                                                                       built_models: Path) -> None:
    config = _door(tmp_path, built_models, _stranger_then_enrollee(tmp_path))  # no tau in the config
    _one_enrollee(config, tmp_path)
    decisions, agent = _run(config)
    assert decisions == [(DecisionKind.UNKNOWN, None), (DecisionKind.GRANTED, "astro")]
    assert "low_tau" not in agent.status().warnings


def test_calibrated_tau_below_the_floor_is_refused_unless_acknowledged_and_then_shown(
        tmp_path: Path, built_models: Path) -> None:
    with pytest.raises(ValidationError, match=r"\[decision\] tau = 0.5 is below the calibrated floor"):
        DecisionConfig(tau=0.5)
    config = _door(tmp_path, built_models, _stranger_then_enrollee(tmp_path), tau=0.5,
                   acknowledge_low_tau=True)  # what the old default did, now only on purpose
    _one_enrollee(config, tmp_path)
    decisions, agent = _run(config)
    # the lone enrollee's margin never blocks: at 0.5 the stranger walks in as the enrollee
    assert decisions[0] == (DecisionKind.GRANTED, "astro")
    warning = agent.status().warnings["low_tau"]
    assert "0.5" in warning and f"floor {op.tau_floor(1):g}" in warning and "(acknowledged)" in warning
    metrics = DeviceMetrics()
    metrics.observe_agent(agent)
    assert 'facegate_device_unsafe_setting{setting="low_tau"} 1.0' in metrics.scrape().decode()
    row = next(r for r in run_checks(config) if r.name == "threshold")
    assert row.status is Status.WARN and "(acknowledged)" in row.detail


def test_calibrated_tau_floor_follows_the_live_gallery_size(tmp_path: Path, built_models: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A floor that rises with the gallery: checked when the gallery loads and whenever it reloads."""
    rising = (op.OperatingPoint(1, 0.90, 0.05), op.OperatingPoint(10, 0.95, 0.05))
    monkeypatch.setattr(op, "CALIBRATED", rising)
    frames = write_frames(tmp_path / "frames", no_face_frames(1))
    config = _door(tmp_path, built_models, frames, tau=0.92)  # above the floor for one person only
    _one_enrollee(config, tmp_path)
    with build_agent(config, sinks=[]) as agent:
        assert agent.status().warnings == {"liveness_off": LIVENESS_OFF}
        with open_pipeline(config) as pipeline, open_gallery(config, pipeline) as gallery:
            other = np.random.default_rng(7).normal(size=(1, EMBEDDING_DIM)).astype(np.float32)
            gallery.add_person("second", "Second", other / np.linalg.norm(other))
            gallery.save()
        with pytest.raises(AgentError, match="reload refused, keeping the running models"):
            agent.reload()
        assert agent.gallery.person_count == 1
    with pytest.raises(AgentError, match=r"below the calibrated floor 0\.95 for a gallery of 2"):
        build_agent(config, sinks=[])

    acknowledged = _door(tmp_path, built_models, frames, tau=0.92, acknowledge_low_tau=True)
    with build_agent(acknowledged, sinks=[]) as agent:
        assert "floor 0.95 for a gallery of 2 person(s)" in agent.status().warnings["low_tau"]


# ----------------------------------------------------------------------------- fetch-liveness


def _models_without_minifasnet(built: Path, dest: Path) -> Path:
    """The built models as a fresh machine has them: links to every file but the MiniFASNets."""
    dest.mkdir()
    manifest = json.loads((built / "manifest.json").read_text(encoding="utf-8"))
    manifest["models"] = [e for e in manifest["models"] if e["role"] != "liveness"]
    for entry in manifest["models"]:
        (dest / entry["file"]).symlink_to(built / entry["file"])
    (dest / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    stamp = json.loads((built / ".build-stamp.json").read_text(encoding="utf-8"))
    stamp["keys"] = {k: v for k, v in stamp["keys"].items() if not k.startswith("minifasnet")}
    (dest / ".build-stamp.json").write_text(json.dumps(stamp), encoding="utf-8")
    return dest


def test_liveness_required_fetch_liveness_from_a_folder_installs_passive(
        tmp_path: Path, built_models: Path, shared_dir: Path) -> None:
    models = _models_without_minifasnet(built_models, tmp_path / "models")
    liveness = DeviceConfig().liveness
    from device.liveness.fusion import FusedLiveness, build_liveness

    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("FACEGATE_MINIFASNET_DIR", raising=False)
        engine = build_liveness(liveness, models)
        assert isinstance(engine, FusedLiveness)
        with engine:
            assert engine.mode == "challenge on every face (passive models missing)"
        result = CliRunner().invoke(main, ["models", "fetch-liveness", "--from",
                                           str(shared_dir / "models" / "minifasnet"), "--out", str(models),
                                           "--no-progress"])
        assert result.exit_code == 0, result.output
        assert {"minifasnet-2.7", "minifasnet-4.0"} <= {e.name for e in load_manifest(models).models}
        engine = build_liveness(liveness, models)
        assert isinstance(engine, FusedLiveness)
        with engine:
            assert engine.mode == "passive + challenge on uncertain"


def test_liveness_required_fetch_liveness_refuses_a_file_that_is_not_the_pinned_one(
        tmp_path: Path, shared_dir: Path) -> None:
    from models.convert.liveness_fetch import PINNED, FetchError, fetch_minifasnet

    source = tmp_path / "offered"
    source.mkdir()
    for pinned in PINNED:
        data = (shared_dir / "models" / "minifasnet" / pinned.name).read_bytes()
        (source / pinned.name).write_bytes(data[:-1] + bytes([data[-1] ^ 1]) if pinned.name.endswith(
            "MiniFASNetV2_float32.tflite") else data)
    with pytest.raises(FetchError, match="expected 9c7d6264"):
        fetch_minifasnet(tmp_path / "dest", source)
    assert not (tmp_path / "dest" / "2.7_80x80_MiniFASNetV2_float32.tflite").exists()
