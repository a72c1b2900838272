"""Shared fixtures: the ../shared data folder, a real mosquitto broker, and the project's built models."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FACEGATE_SHARED", REPO.parent / "shared"))
MOSQUITTO_CANDIDATES = ("mosquitto", "/usr/sbin/mosquitto")
BROKER_START_TIMEOUT_S = 10.0
# Evaluation embeddings of test images are cached with the other slow test inputs, not in ~/.cache.
os.environ.setdefault("FACEGATE_EVAL_CACHE", str(Path(os.environ.get(
    "FACEGATE_TEST_CACHE", Path(os.environ.get("TMPDIR", "/tmp")) / "facegate-test-cache")) / "eval"))


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Say which broker and which shared data the run uses."""
    broker = _mosquitto_binary()
    return [
        f"facegate: shared data {'at ' + str(SHARED) if SHARED.is_dir() else 'ABSENT (tests skip)'}",
        f"facegate: broker {'mosquitto ' + broker if broker else 'embedded amqtt (mosquitto not on PATH)'}",
    ]


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The read-only ../shared folder; skips the test when it is absent (a user's fresh clone)."""
    if not (SHARED / "data").is_dir():
        pytest.skip(f"../shared not present at {SHARED}")
    return SHARED


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(host: str, port: int, timeout: float = BROKER_START_TIMEOUT_S) -> None:
    """Block until something accepts TCP connections on host:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def _mosquitto_binary() -> str | None:
    for candidate in MOSQUITTO_CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    return None


class Broker:
    """A running broker on loopback that a test may stop and restart on the same port."""

    def __init__(self, tmp: Path) -> None:
        self.host = "127.0.0.1"
        self.port = free_port()
        self.tmp = tmp
        self.kind = "mosquitto" if _mosquitto_binary() else "amqtt"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the broker and wait until it accepts connections."""
        if self.kind == "mosquitto":
            conf = self.tmp / "mosquitto.conf"
            conf.write_text(
                f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
                f"persistence_location {self.tmp}/\nmax_queued_messages 100000\nmax_inflight_messages 100\n"
                "message_size_limit 0\n" + ("user root\n" if os.geteuid() == 0 else "")
            )
            binary = _mosquitto_binary()
            assert binary is not None
            self._proc = subprocess.Popen(
                [binary, "-c", str(conf)],
                stdout=subprocess.DEVNULL,
                stderr=open(self.tmp / "mosquitto.log", "ab"),
            )
        else:
            self._proc = subprocess.Popen(
                [
                    str(Path(sys.executable).parent / "python"),
                    "-m",
                    "server.broker",
                    "--host",
                    self.host,
                    "--port",
                    str(self.port),
                ],
                stdout=subprocess.DEVNULL,
                stderr=open(self.tmp / "amqtt.log", "ab"),
            )
        wait_port(self.host, self.port)

    def stop(self) -> None:
        """Stop the broker (idempotent)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        self._proc = None


@pytest.fixture()
def mosquitto(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Broker]:
    """A real mosquitto on a free loopback port (embedded amqtt only when mosquitto is not installed)."""
    broker = Broker(tmp_path)
    if broker.kind != "mosquitto":
        request.node.user_properties.append(("broker", "embedded amqtt: mosquitto not on PATH"))
        print("NOTE: mosquitto not on PATH; using the embedded amqtt broker")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def built_models() -> Path:
    """The directory holding manifest.json of the project's built models (built once, then cached)."""
    from models.build.builder import build_all
    from models.runtime.assets import default_models_dir

    out = default_models_dir()
    # The MiniFASNet liveness models are not on PyPI; ../shared carries them (Apache-2.0). Without it the
    # manifest simply has no passive-liveness entries and the tests that need them skip.
    build_all(out, minifasnet_dir=shared_minifasnet(), progress=False)
    return out


def shared_minifasnet() -> Path | None:
    """../shared's MiniFASNet folder when present (what ``built_models`` builds with), else None."""
    folder = SHARED / "models" / "minifasnet"
    return folder if folder.is_dir() else None
