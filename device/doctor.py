"""``facegate doctor``: check an installation and say how to fix what is wrong.

Each check returns ✓, ✗, ! (works, but an unsafe setting is in force) or - (not applicable) with a
one-line detail and, for ✗ and !, the fix. The command exits non-zero when any check fails (✗).
"""

from __future__ import annotations

import enum
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.request import urlopen

import click

from core.mqtt.client import MqttError, paho_client, settings_from
from device.config import DeviceConfig, load_device_config
from device.decide.operating_point import lowest_tau_floor, tau_floor
from device.gallery.store import GalleryError, read_meta
from device.liveness.base import LIVENESS_OFF, describe_liveness
from device.liveness.passive import PassiveModelError, manifest_minifasnet_files
from facegate.configio import ConfigError
from models.runtime.assets import default_models_dir
from models.runtime.manifest import ManifestError, load_manifest, verify_entry

MIN_FREE_BYTES = 500 * 1024 * 1024  # a bundle is ~tens of MB; keep room for two plus the outbox
MAX_CLOCK_SKEW_S = 5.0  # event timestamps and TLS validity both suffer beyond a few seconds
NET_TIMEOUT_S = 3.0
MQTT_CONNACK_CODES = {
    1: "unacceptable protocol version",
    2: "client id rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorised",
}
# paho reports a 3.1.1 CONNACK as an MQTT 5 reason code; back to the 3.1.1 code for the table above.
PAHO_TO_CONNACK = {132: 1, 133: 2, 136: 3, 134: 4, 135: 5}


class Status(enum.StrEnum):
    """Outcome of one check."""

    OK = "✓"
    FAIL = "✗"
    WARN = "!"
    NA = "-"


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One row of the doctor's table."""

    name: str
    status: Status
    detail: str
    fix: str = ""


def check_models(config: DeviceConfig) -> CheckResult:
    """Every model file matches the sha256 in its manifest."""
    directory = config.models.dir or default_models_dir()
    try:
        manifest = load_manifest(directory)
        for entry in manifest.models:
            verify_entry(directory, entry)
    except ManifestError as exc:
        return CheckResult(
            "models", Status.FAIL, str(exc), "run `facegate models build` or wait for the next bundle install"
        )
    return CheckResult("models", Status.OK, f"{len(manifest.models)} files match {directory}/manifest.json")


def check_liveness(config: DeviceConfig) -> CheckResult:
    """Which liveness checks will run: "liveness off" (explicit) or a fallback for missing models is shown."""
    live = config.liveness
    if not live.enabled:
        return CheckResult("liveness", Status.WARN,
                           f"{LIVENESS_OFF} ([liveness] required = false): a printed photo of an enrolled "
                           "person opens the door",
                           "set [liveness.passive] enabled = true (`facegate models fetch-liveness`) or "
                           '[liveness.challenge] mode = "always"')
    if live.passive.enabled:
        directory = config.models.dir or default_models_dir()
        try:
            manifest_minifasnet_files(directory, live.passive.models)
        except PassiveModelError:
            fix = "run `facegate models fetch-liveness` (or `--from DIR` offline)"
            if live.passive.missing == "refuse":
                return CheckResult("liveness", Status.FAIL, f"MiniFASNet files missing from {directory}: the "
                                   "agent will not start (passive_missing = \"refuse\")", fix)
            fallback = describe_liveness(live.without_passive())
            return CheckResult("liveness", Status.WARN, f"MiniFASNet files missing from {directory}: runs "
                               f"{fallback} instead of {describe_liveness(live)}", fix)
    return CheckResult("liveness", Status.OK, describe_liveness(live))


def _local_gallery_size(config: DeviceConfig) -> int | None:
    """Persons in the standalone gallery, or None (bundled door, or none yet)."""
    try:
        return len(read_meta(config.device.data_dir / "gallery").persons)
    except GalleryError:
        return None


def check_threshold(config: DeviceConfig) -> CheckResult:
    """``decision.tau`` against the calibrated floor for the gallery size (an acknowledged low tau shows)."""
    tau = config.decision.tau
    size = _local_gallery_size(config)
    if size is None:
        floor, where = lowest_tau_floor(), "the smallest gallery"
    else:
        floor, where = tau_floor(size), f"this door's {size} person(s)"
    if tau >= floor:
        return CheckResult("threshold", Status.OK, f"tau {tau:g} (calibrated floor {floor:g} for {where})")
    detail = f"tau {tau:g} is below the calibrated floor {floor:g} for {where}: strangers may be granted"
    fix = "leave [decision] tau out (the calibrated default) or raise it"
    if config.decision.acknowledge_low_tau:
        return CheckResult("threshold", Status.WARN, detail + " (acknowledged)", fix)
    return CheckResult("threshold", Status.FAIL, detail + ": the agent will refuse to start", fix)


def check_camera(config: DeviceConfig) -> CheckResult:
    """The configured frame source can deliver a frame (or, for the Pi camera, its stack imports)."""
    camera = config.camera
    if camera.type == "replay":
        if (camera.path.is_dir() and any(camera.path.iterdir())) or camera.path.is_file():
            return CheckResult("camera", Status.OK, f"replay source {camera.path}")
        return CheckResult(
            "camera",
            Status.FAIL,
            f"replay source {camera.path} is missing or empty",
            "point camera.path at a folder of images or a video file",
        )
    if camera.type == "picamera2":
        try:
            __import__("picamera2")
        except ImportError:
            return CheckResult(
                "camera",
                Status.FAIL,
                "picamera2 is not importable",
                "apt install python3-picamera2 and create the venv with --system-site-packages",
            )
        return CheckResult("camera", Status.OK, "picamera2 importable")
    import cv2

    source: int | str = int(camera.source) if camera.source.isdigit() else camera.source
    capture = cv2.VideoCapture(source)
    try:
        ok, frame = capture.read() if capture.isOpened() else (False, None)
    finally:
        capture.release()
    if not ok or frame is None or frame.size == 0:
        return CheckResult(
            "camera",
            Status.FAIL,
            f"cannot read a frame from {camera.source!r}",
            "check the cable/URL, and that the service user is in the 'video' group",
        )
    return CheckResult(
        "camera", Status.OK, f"{camera.source!r} gives {frame.shape[1]}x{frame.shape[0]} frames"
    )


def _mqtt_connack(config: DeviceConfig) -> int | str:
    """CONNECT with the core MQTT client (same TLS setup as the door); the CONNACK code (0 = accepted), or
    the error text when the TCP/TLS connection or the CONNACK never came."""
    mqtt = config.mqtt
    settings = settings_from(mqtt, f"doctor-{config.device.id}")
    answer: list[int] = []

    def on_connect(client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        value = int(reason_code.value)
        answer.append(PAHO_TO_CONNACK.get(value, value))

    try:
        client = paho_client(settings, v5=False, clean_session=True)
    except MqttError as exc:
        return str(exc)
    client.on_connect = on_connect
    try:
        client.connect(mqtt.host, mqtt.port, mqtt.keepalive_s)
        deadline = time.monotonic() + NET_TIMEOUT_S
        while not answer and time.monotonic() < deadline:
            client.loop(timeout=0.1)
    except (OSError, ssl.SSLError, ValueError) as exc:
        return str(exc)
    finally:
        try:
            client.disconnect()
        except (OSError, ValueError):
            pass
    return answer[0] if answer else "no CONNACK"


def check_broker(config: DeviceConfig) -> CheckResult:
    """A real MQTT CONNECT/CONNACK to the broker with the door's own client settings (TLS included)."""
    mqtt = config.mqtt
    if not mqtt.enabled:
        return CheckResult("broker", Status.NA, "mqtt.enabled = false (standalone door)")
    where = f"{mqtt.host}:{mqtt.port}{' (TLS)' if mqtt.tls else ''}"
    try:
        with socket.create_connection((mqtt.host, mqtt.port), timeout=NET_TIMEOUT_S):
            pass
    except OSError as exc:
        return CheckResult(
            "broker",
            Status.FAIL,
            f"cannot connect to {where}: {exc}",
            "start the broker, or fix mqtt.host/mqtt.port and the firewall",
        )
    code = _mqtt_connack(config)
    if code == "no CONNACK":
        return CheckResult(
            "broker",
            Status.FAIL,
            f"{where} did not answer CONNECT with CONNACK",
            "is this port an MQTT listener?",
        )
    if isinstance(code, str):
        return CheckResult(
            "broker",
            Status.FAIL,
            f"{where}: {code}",
            "check mqtt.ca_file / cert_file / key_file against deploy/mosquitto/make-certs.sh",
        )
    if code != 0:
        reason = MQTT_CONNACK_CODES.get(code, f"code {code}")
        return CheckResult(
            "broker",
            Status.FAIL,
            f"{where} refused the connection: {reason}",
            "check the username/password (FACEGATE_DEVICE__MQTT__PASSWORD) or the certificate CN",
        )
    return CheckResult("broker", Status.OK, f"{where} accepted an MQTT connection")


def _public_key_problem(value: str) -> str | None:
    """None when ``value`` (base64, or a file holding it) is a raw 32-byte Ed25519 public key."""
    import base64
    import binascii

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    text = value.strip()
    path = Path(text)
    if len(text) < 200 and path.is_file():
        text = path.read_text(encoding="utf-8").strip()
    try:
        Ed25519PublicKey.from_public_bytes(base64.b64decode(text, validate=True))
    except (binascii.Error, ValueError) as exc:
        return f"bundle.public_key is not a base64 Ed25519 public key: {exc}"
    return None


def check_signing_key(config: DeviceConfig) -> CheckResult:
    """The pinned bundle-signing public key is present and is an Ed25519 key."""
    if config.bundle.public_key is None:
        if config.mqtt.enabled:
            return CheckResult(
                "signing key",
                Status.FAIL,
                "bundle.public_key is not set: bundles will be refused",
                "copy the server's key: `facegate keys generate` prints it",
            )
        return CheckResult("signing key", Status.NA, "standalone door: no bundles expected")
    problem = _public_key_problem(config.bundle.public_key)
    if problem:
        return CheckResult(
            "signing key", Status.FAIL, problem, "set bundle.public_key to the base64 key or its file"
        )
    return CheckResult("signing key", Status.OK, "Ed25519 public key loads")


def check_clock(time_url: str | None) -> CheckResult:
    """Clock skew against an HTTP server's Date header, else the NTP sync flag."""
    if time_url:
        try:
            with urlopen(time_url, timeout=NET_TIMEOUT_S) as response:  # noqa: S310 (operator-given URL)
                header = response.headers.get("Date")
        except OSError as exc:
            return CheckResult("clock", Status.FAIL, f"cannot reach {time_url}: {exc}", "check --time-url")
        if not header:
            return CheckResult(
                "clock", Status.FAIL, f"{time_url} sent no Date header", "use the facegate server URL"
            )
        skew = abs(parsedate_to_datetime(header).timestamp() - time.time())
        if skew > MAX_CLOCK_SKEW_S:
            return CheckResult(
                "clock",
                Status.FAIL,
                f"clock differs from {time_url} by {skew:.1f} s",
                "enable NTP: timedatectl set-ntp true",
            )
        return CheckResult("clock", Status.OK, f"skew {skew:.1f} s against {time_url}")
    timedatectl = shutil.which("timedatectl")
    if timedatectl:
        proc = subprocess.run(  # noqa: S603 (fixed argv, resolved binary)
            [timedatectl, "show", "-p", "NTPSynchronized", "--value"],
            capture_output=True,
            text=True,
            timeout=NET_TIMEOUT_S,
            check=False,
        )
        if proc.stdout.strip() == "yes":
            return CheckResult("clock", Status.OK, "NTP synchronised")
        if proc.stdout.strip() == "no":
            return CheckResult("clock", Status.FAIL, "NTP is not synchronised", "timedatectl set-ntp true")
    return CheckResult("clock", Status.NA, "no time source to compare with (pass --time-url)")


def check_disk(config: DeviceConfig) -> CheckResult:
    """Free space where the data folder lives."""
    path = config.device.data_dir
    probe = path if path.exists() else next((p for p in path.parents if p.exists()), Path("/"))
    free = shutil.disk_usage(probe).free
    if free < MIN_FREE_BYTES:
        return CheckResult(
            "disk",
            Status.FAIL,
            f"{free / 2**20:.0f} MiB free under {probe}",
            f"free at least {MIN_FREE_BYTES / 2**20:.0f} MiB (old logs, old bundles)",
        )
    return CheckResult("disk", Status.OK, f"{free / 2**30:.1f} GiB free under {probe}")


def check_gpio(config: DeviceConfig) -> CheckResult:
    """The relay's GPIO chip is accessible and gpiozero imports."""
    if config.door.type != "gpio":
        return CheckResult("gpio", Status.NA, "simulated door")
    chips = sorted(Path("/dev").glob("gpiochip*"))
    if not chips:
        return CheckResult(
            "gpio", Status.FAIL, "no /dev/gpiochip*", "run on a Raspberry Pi with GPIO enabled"
        )
    if not os.access(chips[0], os.R_OK | os.W_OK):
        return CheckResult(
            "gpio",
            Status.FAIL,
            f"no read/write access to {chips[0]}",
            "usermod -aG gpio facegate (then log in again / restart the service)",
        )
    try:
        __import__("gpiozero")
    except ImportError:
        return CheckResult("gpio", Status.FAIL, "gpiozero is not importable", "apt install python3-gpiozero")
    return CheckResult("gpio", Status.OK, f"{chips[0]} accessible, pin {config.door.pin}")


def run_checks(config: DeviceConfig, time_url: str | None = None) -> list[CheckResult]:
    """Run every check, turning an unexpected exception into a failed row."""
    checks: list[tuple[str, Callable[[], CheckResult]]] = [
        ("models", lambda: check_models(config)),
        ("liveness", lambda: check_liveness(config)),
        ("threshold", lambda: check_threshold(config)),
        ("camera", lambda: check_camera(config)),
        ("broker", lambda: check_broker(config)),
        ("signing key", lambda: check_signing_key(config)),
        ("clock", lambda: check_clock(time_url)),
        ("disk", lambda: check_disk(config)),
        ("gpio", lambda: check_gpio(config)),
    ]
    results = []
    for name, check in checks:
        try:
            results.append(check())
        except Exception as exc:  # a doctor must report, not crash
            results.append(CheckResult(name, Status.FAIL, f"check crashed: {exc!r}", "report this as a bug"))
    return results


@click.command("doctor")
@click.option(
    "--config", "config_path", type=click.Path(path_type=Path), default=None, help="Device config TOML."
)
@click.option("--time-url", default=None, help="HTTP URL whose Date header is the reference clock.")
def cli(config_path: Path | None, time_url: str | None) -> None:
    """Check models, liveness, threshold, camera, broker, signing key, clock, disk, GPIO; exit 1 on any ✗."""
    from rich.console import Console
    from rich.table import Table

    try:
        config = load_device_config(config_path)
    except ConfigError as exc:
        click.echo(f"✗ config: {exc}", err=True)
        sys.exit(1)
    results = run_checks(config, time_url)
    table = Table(title="facegate doctor")
    for column in ("", "check", "detail", "how to fix"):
        table.add_column(column)
    for result in results:
        table.add_row(result.status.value, result.name, result.detail, result.fix)
    Console(width=160).print(table)
    sys.exit(1 if any(r.status is Status.FAIL for r in results) else 0)
