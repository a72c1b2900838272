"""`facegate server run --validate-config` (exit 0/1 with field paths, like the device), secrets from the
environment, the chip key (env, key file, created 0600), and the create-user / create-token commands."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from facegate.cli import main
from facegate.configio import ConfigError
from server.app import create_app
from server.config import load_server_config
from server.crypto import ChipCipher, CryptoError, load_chip_cipher
from tests.server_support import make_config

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), env=env)
    return result.exit_code, result.stdout, result.stderr


def test_example_config_validates() -> None:
    example = REPO / "deploy" / "server.example.toml"
    code, out, _ = _run("server", "run", "--validate-config", "--config", str(example))
    assert code == 0 and "config OK" in out


def test_bad_config_exits_1_with_every_field_path(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[http]\nport = 0\nbogus = 1\n[recognition]\ntau = 3\n[database]\nurl = "mysql://x"\n'
                   '[mqtt]\ncert_file = "/c.pem"\n')
    code, _, err = _run("server", "run", "--validate-config", "--config", str(bad))
    assert code == 1
    for path in ("http.port", "http.bogus", "recognition.tau", "database.url", "mqtt"):
        assert f"{path}:" in err, (path, err)
    code, _, err = _run("server", "run", "--validate-config", "--config", str(tmp_path / "missing.toml"))
    assert code == 1 and "not found" in err
    (tmp_path / "broken.toml").write_text("[http\n")
    code, _, err = _run("server", "run", "--validate-config", "--config", str(tmp_path / "broken.toml"))
    assert code == 1 and "not valid TOML" in err


def test_secrets_come_from_the_environment(tmp_path: Path) -> None:
    key = base64.b64encode(os.urandom(32)).decode()
    env = {"FACEGATE_SERVER__CRYPTO__CHIP_KEY": key,
           "FACEGATE_SERVER__AUTH__BOOTSTRAP_PASSWORD": "from-the-env-1",
           "FACEGATE_SERVER__MQTT__PASSWORD": "broker-secret"}
    config = load_server_config(None, env)
    assert config.crypto.chip_key is not None and config.crypto.chip_key.get_secret_value() == key
    assert "broker-secret" not in repr(config) and key not in repr(config)
    with pytest.raises(ConfigError) as err:
        load_server_config(None, {"FACEGATE_SERVER__CRYPTO__CHIP_KEY": base64.b64encode(b"short").decode()})
    assert any(e.startswith("crypto.chip_key:") for e in err.value.errors)


def test_chip_key_from_env_file_or_created(tmp_path: Path) -> None:
    created = load_chip_cipher(make_config(tmp_path / "a"))
    path = make_config(tmp_path / "a").chip_key_path
    assert path.is_file() and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_chip_cipher(make_config(tmp_path / "a")).key_id == created.key_id  # reused, not replaced
    key = base64.b64encode(os.urandom(32)).decode()
    from_env = load_chip_cipher(make_config(tmp_path / "b", crypto={"chip_key": key}))
    assert from_env.key_id == ChipCipher(base64.b64decode(key)).key_id
    assert not make_config(tmp_path / "b").chip_key_path.exists()
    with pytest.raises(CryptoError, match="no chip key"):
        load_chip_cipher(make_config(tmp_path / "c", crypto={"create_key_file": False}))
    blob = created.encrypt(b"chip", "id-1")
    assert created.decrypt(blob, "id-1") == b"chip"
    with pytest.raises(CryptoError, match="another key"):
        from_env.decrypt(blob, "id-1")
    with pytest.raises(CryptoError, match="tampered"):
        created.decrypt(blob[:-1] + bytes([blob[-1] ^ 1]), "id-1")


def test_create_user_and_token_commands(tmp_path: Path, db_url: str) -> None:
    config_file = tmp_path / "server.toml"
    config_file.write_text(f'data_dir = "{tmp_path / "data"}"\n[mqtt]\nenabled = false\n'
                           f'[database]\nurl = "{db_url}"\n')
    code, _, err = _run("server", "create-user", "--config", str(config_file), "--username", "ops",
                        "--role", "viewer", "--password", "short")
    assert code == 1 and "at least 10" in err
    code, _, _ = _run("server", "create-user", "--config", str(config_file), "--username", "ops",
                      "--role", "viewer", env={"FACEGATE_NEW_PASSWORD": "a-long-password"})
    assert code == 0
    code, out, _ = _run("server", "create-token", "--config", str(config_file), "--username", "ops")
    assert code == 0
    token = out.strip()
    assert token.startswith("fg_") and len(out.splitlines()) == 1
    code, _, err = _run("server", "create-token", "--config", str(config_file), "--username", "ghost")
    assert code == 1 and "no enabled user" in err
    with TestClient(create_app(load_server_config(config_file), start_mqtt=False)) as client:
        headers = {"Authorization": f"Bearer {token}"}
        assert client.get("/api/auth/me", headers=headers).json() == {"username": "ops", "role": "viewer"}
        assert client.get("/api/events", headers=headers).status_code == 200
        assert client.get("/api/persons", headers=headers).status_code == 403
