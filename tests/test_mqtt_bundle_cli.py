"""``facegate keys generate`` and ``facegate bundle build|publish|status`` end to end with a real device."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

from click.testing import CliRunner

from server.bundles.cli import cli, keys
from tests.bundle_kit import PERSONS, Device
from tests.conftest import Broker
from tests.mqtt_kit import CONNECT_S, make_gallery, make_models_dir


def test_keys_build_publish_status(mosquitto: Broker, tmp_path: Path) -> None:
    runner = CliRunner()
    key_file = tmp_path / "keys" / "bundle.key"
    result = runner.invoke(keys, ["generate", "--out", str(key_file)])
    assert result.exit_code == 0, result.output
    public = result.stdout.strip().splitlines()[-1]
    assert len(base64.b64decode(public)) == 32
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert (tmp_path / "keys" / "bundle.key.pub").read_text().strip() == public
    again = runner.invoke(keys, ["generate", "--out", str(key_file)])
    assert again.exit_code != 0 and "already exists" in again.output
    shown = runner.invoke(keys, ["show", "--key", str(key_file)])
    assert shown.stdout.strip() == public

    models, sha = make_models_dir(tmp_path / "models")
    gallery = make_gallery(tmp_path / "gallery", sha, PERSONS)
    out = tmp_path / "bundles"
    built = runner.invoke(cli, ["build", "--models", str(models), "--gallery", str(gallery), "--out",
                                str(out), "--key", str(key_file), "--chunk-kb", "16", "--plaintext",
                                "--json"])  # the door below allows plaintext explicitly (sealing: elsewhere)
    assert built.exit_code == 0, built.output
    info = json.loads(built.stdout)
    assert info["sequence"] == 1 and info["chunks"] > 1 and Path(info["path"]).is_dir()
    mismatch = make_gallery(tmp_path / "other-gallery", "f" * 64, PERSONS)
    refused = runner.invoke(cli, ["build", "--models", str(models), "--gallery", str(mismatch), "--out",
                                  str(out), "--key", str(key_file), "--plaintext"])
    assert refused.exit_code != 0 and "re-embed" in refused.output

    broker = ["--host", mosquitto.host, "--port", str(mosquitto.port), "--prefix", "facegate",
              "--site", "site"]
    device = Device(mosquitto.host, mosquitto.port, "door-1", tmp_path / "d1", public)
    try:
        assert device.client.wait_connected(CONNECT_S)
        published = runner.invoke(cli, ["publish", info["path"], *broker, "--serve", "60",
                                        "--until-installed", "1"])
        assert published.exit_code == 0, published.output
        device.wait(lambda a: a.running_sequence == 1)
        status = runner.invoke(cli, ["status", *broker, "--sequence", "1", "--listen", "1", "--json"])
        assert status.exit_code == 0, status.output
        report = json.loads(status.stdout)
        assert report["summary"] == {"installed": 1}
        assert report["devices"][0]["device"] == "door-1" and report["devices"][0]["state"] == "installed"
        table = runner.invoke(cli, ["status", *broker, "--listen", "0.5"])
        assert table.exit_code == 0 and "door-1" in table.output
    finally:
        device.close()
