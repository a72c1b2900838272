"""`facegate doctor` fails clearly on a stopped broker and a tampered model file."""

from __future__ import annotations

import hashlib
from pathlib import Path

from click.testing import CliRunner

from facegate.cli import main
from models.runtime.manifest import Manifest, ModelEntry, TensorSpec, save_manifest
from tests.conftest import Broker, free_port


def _models_dir(tmp: Path) -> Path:
    models = tmp / "models"
    models.mkdir()
    blob = models / "embedder.tflite"
    blob.write_bytes(b"model bytes " * 100)
    entry = ModelEntry(
        name="embedder-int8", role="embedder", version="1", file=blob.name,
        sha256=hashlib.sha256(blob.read_bytes()).hexdigest(), size=blob.stat().st_size,
        inputs=[TensorSpec(name="in", shape=[1, 150, 150, 3], dtype="int8")],
        outputs=[TensorSpec(name="out", shape=[1, 128], dtype="int8")],
        source_package="test", source_version="0", license="CC0",
    )
    save_manifest(models, Manifest(created="2026-01-01T00:00:00Z", models=[entry]))
    return models


def _config(tmp: Path, models: Path, port: int) -> Path:
    frames = tmp / "frames"
    frames.mkdir(exist_ok=True)
    (frames / "a.jpg").write_bytes(b"x")
    config = tmp / "device.toml"
    config.write_text(
        f'[device]\ndata_dir = "{tmp / "data"}"\n'
        f'[camera]\ntype = "replay"\npath = "{frames}"\n'
        f'[models]\ndir = "{models}"\n'
        f'[mqtt]\nenabled = true\nhost = "127.0.0.1"\nport = {port}\n'
        '[bundle]\npublic_key = "MCowBQYDK2VwAyEA"\n'
    )
    return config


def test_doctor_fails_on_stopped_broker_and_tampered_model(tmp_path: Path) -> None:
    models = _models_dir(tmp_path)
    config = _config(tmp_path, models, free_port())
    (models / "embedder.tflite").write_bytes(b"tampered")
    result = CliRunner().invoke(main, ["doctor", "--config", str(config)])
    assert result.exit_code == 1
    assert "sha256 mismatch" in result.output
    assert "cannot connect" in result.output
    assert "✗" in result.output


def test_doctor_passes_models_and_broker_when_healthy(tmp_path: Path, mosquitto: Broker) -> None:
    models = _models_dir(tmp_path)
    config = _config(tmp_path, models, mosquitto.port)
    result = CliRunner().invoke(main, ["doctor", "--config", str(config)])
    assert "1 files match" in result.output
    assert "accepted an MQTT connection" in result.output
    # the placeholder key is not a valid 32-byte Ed25519 key: the doctor still fails, on that row only
    assert "not a base64 Ed25519 public key" in result.output
    assert result.exit_code == 1
