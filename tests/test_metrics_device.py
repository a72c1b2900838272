"""The door's Prometheus endpoint: a real agent (built int8 models, replay camera) run by ``run_agent`` with
``[metrics] enabled`` on a free port, scraped over HTTP; and the MQTT-side sources (a real outbox and an
installed signed bundle) through the same registry. Nothing is mocked; prometheus_client parses the text.
"""

from __future__ import annotations

import collections
import json
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from skimage import data

from core.mqtt.client import ClientSettings, MqttClient
from core.types import DecisionKind
from device.agent.runner import build_agent, run_agent
from device.agent.sink import MemorySink
from device.bundles.signing import load_public_key
from device.bundles.store import BundleStore
from device.bundles.updater import BundleUpdater
from device.cli import cli as device_cli
from device.config import load_device_config
from device.decide.operating_point import operating_point
from device.metrics import STAGES, TOTAL_STAGE, DeviceMetrics
from device.mqtt.outbox import Outbox
from tests.agent_support import (
    LIVENESS_OFF,
    astronaut_frames,
    no_face_frames,
    save_rgb,
    stranger_frames,
    wait_until,
    write_config,
    write_frames,
)
from tests.bundle_kit import TOPICS, build, copy_assembler
from tests.metrics_kit import value
from tests.mqtt_kit import keypair

POINT = operating_point(1)  # the calibrated open-set operating point for one enrolled person
PERSON = "astro"


def scrape(port: int) -> tuple[str, dict[str, Metric]]:
    """GET /metrics over HTTP; the text and its families by name."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode("utf-8")
    return text, {family.name: family for family in text_string_to_metric_families(text)}


def decisions(families: dict[str, Metric], kind: str) -> float:
    """The decision counter for one kind."""
    return value(families, "facegate_device_decisions", "facegate_device_decisions_total", kind=kind)


def _door_config(tmp_path: Path, models: Path) -> Path:
    return write_config(tmp_path / "device.toml", {
        "device": {"id": "door-metrics", "data_dir": str(tmp_path / "data")},
        "models": {"dir": str(models)},
        # A looping replay keeps frames flowing until the test stops the agent: no timing window.
        "camera": {"type": "replay", "path": str(tmp_path / "frames"), "fps": 10.0, "loop": True},
        "door": {"type": "simulated", "unlock_seconds": 5.0},
        "decision": {"tau": POINT.tau, "delta": POINT.delta, "confirm_k": 2, "confirm_n": 3,
                     "cooldown_s": 600.0,
                     "track_timeout_s": 1.0},
        "loop": {"queue_size": 512, "events_jsonl": str(tmp_path / "events.jsonl")},
        "metrics": {"enabled": True, "host": "127.0.0.1", "port": 0},
        "liveness": LIVENESS_OFF,
    })


def _enroll(config: Path, tmp_path: Path) -> None:
    photo = save_rgb(tmp_path / "enroll" / "astronaut.png", data.astronaut())
    result = CliRunner().invoke(device_cli, ["enroll", "--config", str(config), "--person-id", PERSON,
                                             "--name", "Person Astro", str(photo)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["accepted"]


def test_agent_metrics_match_its_decisions_and_stop_with_it(tmp_path: Path, built_models: Path) -> None:
    config_path = _door_config(tmp_path, built_models)
    _enroll(config_path, tmp_path)
    write_frames(tmp_path / "frames", no_face_frames(4) + astronaut_frames(8) + no_face_frames(20)
                 + stranger_frames(6) + no_face_frames(4))
    config = load_device_config(config_path)
    sink = MemorySink()
    agent = build_agent(config, sinks=[sink])
    metrics = DeviceMetrics()
    codes: list[int] = []
    runner = threading.Thread(target=lambda: codes.append(run_agent(config, agent, metrics)), daemon=True)
    runner.start()
    try:
        assert wait_until(lambda: metrics.port is not None), "the metrics endpoint never came up"
        port = metrics.port
        assert port is not None and port > 0
        kinds = {DecisionKind.GRANTED, DecisionKind.UNKNOWN}
        assert wait_until(lambda: kinds <= {d.kind for d in sink.decisions}), sink.decisions

        # The metrics sink runs just after the memory sink; poll until one scrape agrees with it.
        scraped: list[tuple[str, dict[str, Metric]]] = []

        def agrees() -> bool:
            text, families = scrape(port)
            expected = collections.Counter(d.kind.value for d in sink.decisions)
            got = {k.value: decisions(families, k.value) for k in DecisionKind}
            counts = {stage: value(families, "facegate_device_stage_latency_seconds",
                                   "facegate_device_stage_latency_seconds_count", stage=stage)
                      for stage in (*STAGES, TOTAL_STAGE)}
            total = sum(expected.values())
            if got != {k.value: float(expected.get(k.value, 0)) for k in DecisionKind}:
                return False
            if set(counts.values()) != {float(total)}:
                return False
            scraped.append((text, families))
            return True

        assert wait_until(agrees), "the scraped decision counts never matched the emitted decisions"
        text, families = scraped[-1]
        assert decisions(families, "granted") == 1.0  # cooldown: one grant however often the replay loops
        assert decisions(families, "unknown") >= 1.0
        for stage in (*STAGES, TOTAL_STAGE):
            assert value(families, "facegate_device_stage_latency_seconds",
                         "facegate_device_stage_latency_seconds_sum", stage=stage) > 0
        # Every processed frame is timed, faceless ones included: more frames than decisions.
        frames = value(families, "facegate_device_processing_latency_seconds",
                       "facegate_device_processing_latency_seconds_count", stage="frame")
        faces = value(families, "facegate_device_processing_latency_seconds",
                      "facegate_device_processing_latency_seconds_count", stage="embed")
        assert frames > faces > sum(decisions(families, k.value) for k in DecisionKind)
        assert frames <= value(families, "facegate_device_frames_processed",
                               "facegate_device_frames_processed_total")
        assert value(families, "facegate_device_fps") > 0
        assert value(families, "facegate_device_uptime_seconds") > 0
        assert value(families, "facegate_device_frames_processed",
                     "facegate_device_frames_processed_total") > 0
        assert value(families, "facegate_device_queue_drops", "facegate_device_queue_drops_total") >= 0
        assert value(families, "facegate_device_running") == 1.0
        door = {s.labels["facegate_device_door_state"]: s.value
                for s in families["facegate_device_door_state"].samples}
        assert set(door) == {"locked", "unlocked", "fault"} and sorted(door.values()) == [0, 0, 1]
        status = agent.status()
        info = families["facegate_device_versions_info"].samples[0].labels
        assert info["model_sha256"] == status.model_sha256 and info["model_version"] == status.model_version
        assert info["gallery_version"].startswith("1-")
        # A standalone door has no outbox or bundles; no person ids or names ever appear.
        assert "facegate_device_outbox_depth" not in families
        assert "facegate_device_bundle_sequence" not in families
        assert PERSON not in text and "Astro" not in text
    finally:
        agent.request_stop()
        runner.join(30)
    assert not runner.is_alive() and codes == [0]
    assert metrics.port is None
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)


def test_outbox_depth_and_bundle_sequence_from_the_mqtt_side(tmp_path: Path) -> None:
    key, public = keypair()
    bundle = build(tmp_path, key, sequence=3)
    store = BundleStore(tmp_path / "device" / "bundles", load_public_key(public), require_sealed=False)
    store.install(bundle.announce, copy_assembler(bundle))
    # The updater only reads the store here; its client is never started (no broker needed).
    updater = BundleUpdater(MqttClient(ClientSettings("127.0.0.1", 1883, "door-m")), TOPICS, "door-m", store)
    outbox = Outbox(tmp_path / "device" / "outbox.sqlite3", max_events=10)
    metrics = DeviceMetrics()
    metrics.observe_mqtt(outbox, updater)
    try:
        port = metrics.serve("127.0.0.1", 0)
        _, families = scrape(port)
        assert value(families, "facegate_device_outbox_depth") == 0
        assert value(families, "facegate_device_bundle_sequence") == 3
        assert value(families, "facegate_device_gallery_delta_sequence") == 0
        assert "facegate_device_fps" not in families  # no agent attached

        seqs = [outbox.append(f"event-{i}", "facegate/site/door-m/event", lambda s: b"{}") for i in range(12)]
        _, families = scrape(port)
        assert value(families, "facegate_device_outbox_depth") == 10  # bounded: the oldest two evicted
        assert value(families, "facegate_device_outbox_dropped", "facegate_device_outbox_dropped_total") == 2
        outbox.delete(seqs[-4:])
        _, families = scrape(port)
        assert value(families, "facegate_device_outbox_depth") == 6

        outbox.close()  # a closed outbox leaves its families out; the scrape itself still works
        _, families = scrape(port)
        assert "facegate_device_outbox_depth" not in families
        assert value(families, "facegate_device_bundle_sequence") == 3
    finally:
        metrics.close()
        metrics.close()
        outbox.close()
    assert metrics.port is None
