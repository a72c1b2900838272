"""deploy/ artifacts: systemd units verify and carry the hardening; compose and install script are sane."""

from __future__ import annotations

import base64
import configparser
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UNITS = sorted((REPO / "deploy" / "systemd").glob("*.service"))
HARDENING = {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
             "SystemCallFilter": "@system-service", "ProtectProc": "invisible"}


def _parse(unit: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(unit.read_text())
    return parser


def test_units_exist() -> None:
    assert {u.name for u in UNITS} == {"facegate-device.service", "facegate-server.service"}


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_unit_has_restart_user_and_hardening(unit: Path) -> None:
    parsed = _parse(unit)
    service = parsed["Service"]
    assert service["Restart"] in {"always", "on-failure"}
    assert service["User"] == "facegate"
    for key, value in HARDENING.items():
        assert service[key] == value, key
    assert "/var/lib/facegate" in service["ReadWritePaths"]
    assert "--validate-config" in service["ExecStartPre"]
    assert parsed["Install"]["WantedBy"] == "multi-user.target"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not available")
@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_systemd_analyze_verify(unit: Path, tmp_path: Path) -> None:
    # verify checks that ExecStart binaries exist: point them at an executable that does.
    text = unit.read_text().replace("/opt/facegate/venv/bin/facegate", shutil.which("true") or "/bin/true")
    copy = tmp_path / unit.name
    copy.write_text(text)
    proc = subprocess.run(["systemd-analyze", "verify", str(copy)],
                          capture_output=True, text=True, timeout=60)
    problems = [line for line in (proc.stdout + proc.stderr).splitlines()
                if unit.name in line or "Unknown" in line or "error" in line.lower()]
    assert proc.returncode == 0 and not problems, proc.stdout + proc.stderr


def test_compose_has_healthchecks() -> None:
    compose = (REPO / "deploy" / "docker-compose.yml").read_text()
    for service in ("server:", "mosquitto:", "postgres:"):
        assert service in compose
    assert compose.count("healthcheck:") >= 3


def test_pi_install_script_parses_and_covers_the_steps() -> None:
    script = REPO / "deploy" / "pi" / "install.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    for needle in ("python3-picamera2", "python3-gpiozero", "--system-site-packages", "[device]",
                   "usermod", "gpio", "systemctl enable"):
        assert needle in text, needle


def test_pi_kiosk_autostart_opens_the_loopback_screen_in_kiosk_mode() -> None:
    browser = REPO / "deploy" / "pi" / "facegate-kiosk-browser"
    subprocess.run(["bash", "-n", str(browser)], check=True)
    text = browser.read_text()
    assert "--kiosk" in text and "http://127.0.0.1:8088/kiosk" in text
    desktop = configparser.ConfigParser(interpolation=None)
    desktop.read_string((REPO / "deploy" / "pi" / "facegate-kiosk.desktop").read_text())
    entry = desktop["Desktop Entry"]
    assert entry["Type"] == "Application" and entry["Exec"] == "/opt/facegate/bin/facegate-kiosk-browser"
    install = (REPO / "deploy" / "pi" / "install.sh").read_text()
    assert "/etc/xdg/autostart/facegate-kiosk.desktop" in install and "facegate-kiosk-browser" in install


def test_compose_environment_is_a_valid_server_config() -> None:
    """Every FACEGATE_SERVER__* variable compose sets names a real config field, and the result loads."""
    from server.config import load_server_config

    compose = (REPO / "deploy" / "docker-compose.yml").read_text(encoding="utf-8")
    names = re.findall(r"^\s+(FACEGATE_SERVER__[A-Z0-9_]+):\s*(\S+)", compose, flags=re.MULTILINE)
    assert len(names) >= 5
    environ = {}
    for name, value in names:
        # ${VAR:?msg} / ${VAR:-default}: a real deployment fills these; use the default or a valid stand-in.
        default = re.match(r"\$\{[A-Z_]+:-(.+)\}$", value)
        environ[name] = default.group(1) if default else value.strip('"')
    environ["FACEGATE_SERVER__CRYPTO__CHIP_KEY"] = base64.b64encode(bytes(32)).decode()
    environ["FACEGATE_SERVER__AUTH__BOOTSTRAP_PASSWORD"] = "a-long-enough-password"
    config = load_server_config(REPO / "deploy" / "server.example.toml", environ)
    assert config.http.host == "0.0.0.0"  # noqa: S104 - inside the container
    assert config.mqtt.tls and config.mqtt.host == "mosquitto" and config.mqtt.port == 8883
    assert config.crypto.chip_key is not None and config.auth.bootstrap_password is not None


def test_hostile_secrets_are_git_ignored() -> None:
    """deploy/certs (CA and client keys) and compose's .env never enter git."""
    for path in ("deploy/certs/ca.key", "deploy/certs/door-1.key", "deploy/.env", ".env"):
        proc = subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", path], check=False)
        assert proc.returncode == 0, f"{path} is not git-ignored"


def _compose_mounts() -> dict[str, list[str]]:
    """Volume sources per compose service (a plain parse: two-space service names, dashed volumes)."""
    mounts: dict[str, list[str]] = {}
    service = ""
    for line in (REPO / "deploy" / "docker-compose.yml").read_text(encoding="utf-8").splitlines():
        named = re.match(r"^  ([a-z0-9_-]+):\s*$", line)
        if named:
            service = named.group(1)
        volume = re.match(r"^\s+- (\./\S+?):(\S+)", line)
        if volume and service:
            mounts.setdefault(service, []).append(volume.group(1))
    return mounts


def test_hostile_compose_mounts_only_each_containers_own_key() -> None:
    """No container sees ca.key or another client's key; each gets its own key plus the CA cert."""
    mounts = _compose_mounts()
    for service in ("mosquitto", "server"):
        certs = [m for m in mounts[service] if m.startswith("./certs")]
        assert "./certs" not in certs and "./certs/" not in certs, f"{service} mounts the whole certs folder"
        assert "./certs/ca.crt" in certs
        assert "./certs/ca.key" not in certs
        keys = [m for m in certs if m.endswith(".key")]
        assert len(keys) == 1, (service, keys)
    assert mounts["mosquitto"].count("./certs/server.key") == 1
    assert mounts["server"].count("./certs/facegate-server.key") == 1


def test_pi_install_pins_versions_with_a_constraints_file() -> None:
    """Every pip install in the Pi installer runs under the constraints file, which pins exact versions."""
    text = (REPO / "deploy" / "pi" / "install.sh").read_text()
    installs = [line for line in text.splitlines() if "pip\" install" in line]
    assert installs and all("-c \"$constraints\"" in line for line in installs), installs
    pins = [line for line in (REPO / "deploy" / "pi" / "constraints.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    assert pins and all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][A-Za-z0-9.+-]*", p) for p in pins), pins
    from importlib.metadata import PackageNotFoundError, requires
    try:
        wanted = [r for r in requires("facegate") or [] if "extra == \"device\"" in r]
    except PackageNotFoundError:
        pytest.skip("facegate is not installed")
    pinned = {re.split("==", p)[0].lower().replace("_", "-") for p in pins}
    for requirement in wanted:
        name = re.split(r"[<>=!;\[ ]", requirement)[0].lower().replace("_", "-")
        assert name in pinned, f"the device extra's {name} has no pin"


def test_hostile_acl_door_blocks_match_make_certs() -> None:
    """Every door block in facegate.acl is exactly what `make-certs.sh acl hq NAME` prints (no drift)."""
    acl = (REPO / "deploy" / "mosquitto" / "facegate.acl").read_text()
    doors = re.findall(r"^user (door-\S+)$", acl, flags=re.MULTILINE)
    assert doors
    for door in doors:
        block = subprocess.run([str(REPO / "deploy" / "mosquitto" / "make-certs.sh"), "acl", "hq", door],
                               capture_output=True, text=True, check=True).stdout
        assert block in acl, door
    assert not re.search(r"^pattern .*facegate/\+/", acl, flags=re.MULTILINE), "the site must be bound"
