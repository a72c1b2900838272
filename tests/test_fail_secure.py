"""Fail-secure at the door, proven: a SIGKILLed agent restarts locked before its models load; an exception in
the pipeline or the gallery locks an unlocked door; a relay that cannot lock is a fault, an event and never
a grant; a liveness that always says spoof never unlocks; a deletion is acked only when the live gallery no
longer holds the person.

Real parts throughout: the project's built models, a real broker, ``facegate device run`` as a process,
signed bundles and deltas. Faked only: the GPIO relay (a ``gpiozero`` module in its real API's shape) and,
to inject failures, the pipeline, gallery and loader methods that raise.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from click.testing import CliRunner
from skimage import data

from core.mqtt.client import ClientSettings, MqttClient
from core.protocol.schemas import BundleAck
from core.types import DecisionKind, Detection, ImageArray, LivenessCheck, LivenessResult, LivenessVerdict
from device.agent import MemorySink
from device.agent.loop import Agent
from device.agent.runner import build_agent, open_gallery, open_pipeline
from device.bundles.updater import BundleUpdater
from device.config import DeviceConfig, GalleryConfig
from device.door import DoorError, DoorState
from device.door.simulated import read_state_file
from device.enroll import enroll
from device.gallery import Gallery, GalleryError
from device.mqtt.runtime import bundle_loader, make_delta_live, open_store
from device.vision.embedder import EMBEDDING_DIM
from device.vision.pipeline import FacePipeline
from facegate.cli import main
from server.bundles.builder import build_bundle
from server.bundles.delta import MqttGallerySync
from server.bundles.signing import generate_key, public_key_b64
from server.enrollment.deletion import SUCCESS_STATES
from tests.agent_support import (
    LIVENESS_OFF,
    astronaut_frames,
    no_face_frames,
    save_rgb,
    wait_until,
    write_config,
    write_frames,
)
from tests.bundle_kit import TOPICS, copy_assembler
from tests.conftest import REPO, Broker
from tests.mqtt_kit import Collector

FACEGATE = str(Path(sys.executable).parent / "facegate")


def enroll_astronaut(config: DeviceConfig, tmp_path: Path) -> None:
    """One enrollee in the door's local gallery (the real pipeline and quality gates)."""
    photo = save_rgb(tmp_path / "enroll" / "astronaut.png", data.astronaut())
    with open_pipeline(config) as pipeline, open_gallery(config, pipeline) as gallery:
        assert enroll(config, pipeline, gallery, "astro", "Astronaut", [photo])[0].accepted


def door_config(tmp_path: Path, models: Path, frames: Path, **sections: dict[str, Any]) -> DeviceConfig:
    """A standalone door on a looping replay; sections override (liveness off unless given)."""
    base: dict[str, dict[str, Any]] = {
        "device": {"id": "door-fs", "data_dir": str(tmp_path / "data")},
        "models": {"dir": str(models)},
        "camera": {"type": "replay", "path": str(frames), "fps": 10.0, "loop": True},
        "door": {"type": "simulated", "unlock_seconds": 300.0},
        "decision": {"cooldown_s": 3600.0, "track_timeout_s": 5.0},
        "loop": {"queue_size": 64},
        "liveness": dict(LIVENESS_OFF),
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return DeviceConfig.model_validate(base)


# ----------------------------------------------------------------------------- restart after SIGKILL


def _door_output(state_file: Path) -> tuple[str, int] | None:
    state = read_state_file(state_file)
    return None if state is None else (str(state["output"]), int(str(state["pid"])))


def _start(config: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([FACEGATE, "device", "run", "--config", str(config)], cwd=REPO,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _stop(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    return err


def test_fail_secure_sigkill_while_unlocked_restarts_locked_before_the_models_load(
        tmp_path: Path, built_models: Path, mosquitto: Broker) -> None:
    frames = write_frames(tmp_path / "frames", no_face_frames(2))
    state_file = tmp_path / "relay.json"  # the simulated relay's output outlives the process, as a relay does
    models = tmp_path / "models"  # a link: the second start finds no models behind it
    models.symlink_to(built_models)
    config = write_config(tmp_path / "door.toml", {
        "device": {"id": "door-kill", "site": "hq", "data_dir": str(tmp_path / "data")},
        "models": {"dir": str(models)},
        "camera": {"type": "replay", "path": str(frames), "fps": 5.0, "loop": True},
        "door": {"type": "simulated", "unlock_seconds": 300.0, "state_file": str(state_file)},
        "mqtt": {"enabled": True, "host": mosquitto.host, "port": mosquitto.port, "prefix": "facegate"},
        "bundle": {"enabled": False},
    })
    available = "facegate/hq/door-kill/available"
    watcher = Collector(mosquitto.host, mosquitto.port, [available, "facegate/hq/door-kill/status"],
                        client_id="watcher")
    proc = _start(config)
    try:
        assert watcher.wait(lambda ms: any(m.topic == available and m.payload == b"online" for m in ms), 120)
        unlock = CliRunner().invoke(main, ["device", "unlock", "--config", str(config), "--seconds", "300",
                                           "--requested-by", "test"])
        assert unlock.exit_code == 0, unlock.output
        assert wait_until(lambda: _door_output(state_file) == ("unlocked", proc.pid))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert _door_output(state_file) == ("unlocked", proc.pid)  # killed: the relay is left energised

        # Restart with the models unavailable: it cannot run, yet the door was locked first.
        models.unlink()
        models.symlink_to(tmp_path / "nowhere")
        broken = _start(config)
        assert broken.wait(timeout=120) == 1
        err = _stop(broken)
        assert _door_output(state_file) == ("locked", broken.pid), err[-3000:]
        assert "agent cannot start" in err

        # Restart with the models back: locked again, by the new process, before the models load.
        models.unlink()
        models.symlink_to(built_models)
        again = _start(config)
        assert again.stderr is not None
        lines: list[str] = []
        for line in again.stderr:
            lines.append(line)
            if "agent door-kill started" in line:
                break
        assert _door_output(state_file) == ("locked", again.pid)
        locked_at = next(i for i, line in enumerate(lines) if "locked at start" in line)
        started_at = next(i for i, line in enumerate(lines) if "agent door-kill started" in line)
        assert locked_at < started_at, "".join(lines)
        _stop(again)
    finally:
        watcher.close()
        if proc.poll() is None:
            proc.kill()


# ----------------------------------------------------------------------------- errors while unlocked


@pytest.mark.parametrize("failing", ["pipeline", "gallery"])
def test_fail_secure_exception_while_unlocked_locks_the_door(tmp_path: Path, built_models: Path, failing: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    frames = write_frames(tmp_path / "frames", astronaut_frames(4))
    config = door_config(tmp_path, built_models, frames)
    enroll_astronaut(config, tmp_path)
    sink = MemorySink()
    with build_agent(config, sinks=[sink]) as agent:
        agent.start()
        assert wait_until(lambda: agent.status().frames_processed >= 2)
        agent.manual_unlock(300, requested_by="test")
        assert agent.door.state is DoorState.UNLOCKED

        def boom(*_args: object, **_kwargs: object) -> object:
            raise RuntimeError(f"injected {failing} failure")

        monkeypatch.setattr(FacePipeline if failing == "pipeline" else Gallery,
                            "analyze" if failing == "pipeline" else "search", boom)
        assert wait_until(lambda: agent.door.state is DoorState.LOCKED)
        assert agent.door.transitions[-1].reason == "processing error"
        assert agent.status().processing_errors >= 1 and agent.status().running


# ----------------------------------------------------------------------------- the relay fails


class FakeRelay:
    """gpiozero.DigitalOutputDevice's shape: on(), off(), value, close(); ``broken`` makes it raise."""

    broken: ClassVar[set[str]] = set()
    instances: ClassVar[list[FakeRelay]] = []

    def __init__(self, pin: int, active_high: bool = True, initial_value: bool = False) -> None:
        self.pin, self.active_high, self.value = pin, active_high, initial_value
        self.calls: list[str] = []
        FakeRelay.instances.append(self)

    def _set(self, name: str, value: bool) -> None:
        self.calls.append(name)
        if name in FakeRelay.broken:
            raise OSError(f"GPIO{self.pin}: relay driver not responding")
        self.value = value

    def on(self) -> None:
        self._set("on", True)

    def off(self) -> None:
        self._set("off", False)

    def close(self) -> None:
        self.calls.append("close")


@pytest.fixture()
def fake_gpiozero(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[FakeRelay]]:
    module = types.ModuleType("gpiozero")
    module.DigitalOutputDevice = FakeRelay  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "gpiozero", module)
    FakeRelay.broken, FakeRelay.instances = set(), []
    yield FakeRelay


def _kinds(sink: MemorySink) -> list[tuple[DecisionKind, str]]:
    return [(d.kind, d.reason) for d in sink.decisions]


def test_fail_secure_relay_that_cannot_lock_is_a_fault_an_event_and_never_a_grant(
        tmp_path: Path, built_models: Path, fake_gpiozero: type[FakeRelay]) -> None:
    frames = write_frames(tmp_path / "frames", astronaut_frames(6))
    config = door_config(tmp_path, built_models, frames,
                         door={"type": "gpio", "pin": 17, "unlock_seconds": 300.0})
    enroll_astronaut(config, tmp_path)
    sink = MemorySink()
    with build_agent(config, sinks=[sink]) as agent:
        (relay,) = fake_gpiozero.instances
        assert relay.calls == ["off"] and agent.door.state is DoorState.LOCKED  # driven locked at start
        fake_gpiozero.broken = {"on", "off"}  # the relay stops responding
        agent.start()
        assert wait_until(lambda: any(k is DecisionKind.DOOR_FAULT for k, _ in _kinds(sink)))
        assert agent.door.state is DoorState.FAULT
        assert wait_until(lambda: (DecisionKind.DENIED, "door_fault") in _kinds(sink))
        assert DecisionKind.GRANTED not in [k for k, _ in _kinds(sink)]
        assert relay.value is False  # never energised
        with pytest.raises(DoorError, match="fault"):
            agent.manual_unlock(5, requested_by="test")  # a door in fault refuses every unlock
        assert agent.status().door_state == "fault"
        fault = next(d for d in sink.decisions if d.kind is DecisionKind.DOOR_FAULT)
        assert "relay driver not responding" in fault.reason and fault.person_id is None


def test_fail_secure_relay_that_cannot_relock_after_a_grant_is_a_fault_event(
        tmp_path: Path, built_models: Path, fake_gpiozero: type[FakeRelay]) -> None:
    frames = write_frames(tmp_path / "frames", astronaut_frames(6))
    config = door_config(tmp_path, built_models, frames,
                         door={"type": "gpio", "pin": 17, "unlock_seconds": 1.0})
    enroll_astronaut(config, tmp_path)
    sink = MemorySink()
    with build_agent(config, sinks=[sink]) as agent:
        agent.start()
        assert wait_until(lambda: (DecisionKind.GRANTED, "") in _kinds(sink))
        fake_gpiozero.broken = {"off"}  # the window ends and the relay will not release
        assert wait_until(lambda: agent.door.state is DoorState.FAULT)
        assert wait_until(lambda: any(k is DecisionKind.DOOR_FAULT for k, _ in _kinds(sink)))
        with pytest.raises(DoorError):
            agent.manual_unlock(5, requested_by="test")


# ----------------------------------------------------------------------------- liveness that says spoof


class AlwaysSpoof:
    """A liveness engine that calls every face a spoof (no ../shared, no MiniFASNet needed)."""

    def assess(self, rgb: ImageArray, detection: Detection, track_id: int,
               timestamp: float, mesh: Any = None) -> LivenessResult:
        return LivenessResult(LivenessVerdict.SPOOF, (LivenessCheck("stub", 0.0, LivenessVerdict.SPOOF),))

    def end_track(self, track_id: int) -> None:
        """Nothing to forget."""


def test_fail_secure_always_spoof_liveness_never_unlocks(tmp_path: Path, built_models: Path) -> None:
    frames = write_frames(tmp_path / "frames", no_face_frames(1) + astronaut_frames(12) + no_face_frames(1))
    # The secure defaults (liveness required, calibrated tau), with the stub as the engine.
    config = DeviceConfig.model_validate({
        "device": {"id": "door-spoof", "data_dir": str(tmp_path / "data")},
        "models": {"dir": str(built_models)},
        "camera": {"type": "replay", "path": str(frames), "fps": 10.0, "loop": False},
        "door": {"type": "simulated", "unlock_seconds": 300.0},
        "decision": {"track_timeout_s": 5.0},
        "loop": {"queue_size": 64},
    })
    enroll_astronaut(config, tmp_path)
    sink = MemorySink()
    with build_agent(config, sinks=[sink], liveness=AlwaysSpoof()) as agent:
        agent.start()
        assert agent.wait(120)
        kinds = [d.kind for d in sink.decisions]
        assert kinds == [DecisionKind.SPOOF], kinds  # once per track; the door never opened
        assert all(t.state is DoorState.LOCKED for t in agent.door.transitions)


# ----------------------------------------------------------------------------- honest deletion


class BundledDoor:
    """A door running a real signed bundle (built models + a gallery with the astronaut) over MQTT."""

    def __init__(self, tmp_path: Path, models: Path, broker: Broker) -> None:
        private = generate_key(tmp_path / "signing.key")
        self.private = private
        frames = write_frames(tmp_path / "frames", no_face_frames(2))
        self.config = door_config(tmp_path, models, frames, device={"site": TOPICS.site},
                                  mqtt={"enabled": True, "host": broker.host, "port": broker.port},
                                  bundle={"public_key": public_key_b64(private),
                                          "require_sealed_gallery": False})  # hand-built, plaintext
        source = tmp_path / "gallery-src"
        photo = save_rgb(tmp_path / "enroll" / "astronaut.png", data.astronaut())
        with open_pipeline(self.config) as pipeline:
            self.model_sha = pipeline.model_sha256
            with Gallery.create(source, EMBEDDING_DIM, pipeline.model_sha256, GalleryConfig(),
                                pipeline.model_version) as gallery:
                assert enroll(self.config, pipeline, gallery, "astro", "Astronaut", [photo])[0].accepted
                other = np.random.default_rng(3).normal(size=(1, EMBEDDING_DIM)).astype(np.float32)
                gallery.add_person("other", "Other", other / np.linalg.norm(other))
                gallery.save()
            self.probe = pipeline.analyze(data.astronaut())[0].embedding.vector
        built = build_bundle(models, source, tmp_path / "bundles", private, sequence=1)
        store = open_store(self.config)
        assert store is not None
        store.install(built.announce, copy_assembler(built))
        self.agent: Agent = build_agent(self.config, loader=bundle_loader(self.config, store), sinks=[])
        self.client = MqttClient(ClientSettings(broker.host, broker.port, "door-deletion"))
        self.updater = BundleUpdater(self.client, TOPICS, self.config.device.id, store, self.config.bundle,
                                     on_installed=lambda _b: None,
                                     on_gallery_changed=make_delta_live(self.agent))
        self.updater.start()
        self.client.start()
        self.server = MqttClient(ClientSettings(broker.host, broker.port, "server-deletion")).start()
        assert self.client.wait_connected(10) and self.server.wait_connected(10)
        self.sync = MqttGallerySync(self.server, TOPICS, tmp_path / "ledger", private)

    def recognises_astro(self) -> bool:
        """Whether the live gallery still answers the astronaut's face with the astronaut."""
        return self.agent.gallery.search(self.probe).person_id == "astro"

    def wait_ack(self, seq: int, state: str) -> BundleAck:
        assert self.updater.wait_for(lambda a: a.delta_sequence == seq and a.delta_state == state, 60), \
            self.updater.last_ack
        return self.updater.last_ack

    def close(self) -> None:
        self.updater.close()
        self.client.close()
        self.server.close()
        self.agent.stop()


@pytest.fixture()
def bundled_door(tmp_path: Path, built_models: Path, mosquitto: Broker) -> Iterator[BundledDoor]:
    door = BundledDoor(tmp_path, built_models, mosquitto)
    try:
        yield door
    finally:
        door.close()


def test_fail_secure_deletion_when_the_reload_fails_is_made_live_in_place(
        bundled_door: BundledDoor, monkeypatch: pytest.MonkeyPatch) -> None:
    door = bundled_door
    assert door.recognises_astro() and door.agent.gallery.person_count == 2

    def unreadable() -> object:
        raise GalleryError("injected: the working gallery cannot be read back")

    monkeypatch.setattr(door.agent, "_loader", unreadable)
    seq = door.sync.publish_remove(door.model_sha, "astro", [])
    assert seq is not None
    ack = door.wait_ack(seq, "removals_only")
    assert ack.delta_reason is not None and "adds not loaded" in ack.delta_reason
    assert "cannot be read back" in ack.delta_reason
    assert "astro" not in door.agent.gallery and not door.recognises_astro()  # gone from the live gallery
    assert door.agent.gallery.person_count == 1
    assert ack.delta_state in SUCCESS_STATES  # the removal is proven live, so the server may confirm


def test_fail_secure_deletion_not_live_is_acked_rejected_and_retried_when_offered_again(
        bundled_door: BundledDoor, monkeypatch: pytest.MonkeyPatch) -> None:
    door = bundled_door

    def stuck(person_id: str) -> int:
        raise GalleryError("injected: the live index refused the removal")

    with monkeypatch.context() as patch:
        patch.setattr(door.agent.gallery, "remove_person", stuck)  # the live copy only, not the one on disk
        seq = door.sync.publish_remove(door.model_sha, "astro", [])
        assert seq is not None
        ack = door.wait_ack(seq, "rejected")
    assert ack.delta_reason is not None and "not live in the running door" in ack.delta_reason
    assert door.recognises_astro()  # the door still knows the face: nothing may say otherwise
    assert ack.delta_state not in SUCCESS_STATES  # so the server's deletion stays pending

    door.server.publish(TOPICS.gallery_delta, door.sync.ledger.delta(door.private).to_bytes(), qos=1,
                        retain=True).wait_for_publish(10)  # the server offers the delta again
    door.wait_ack(seq, "applied")
    assert not door.recognises_astro() and "astro" not in door.agent.gallery
