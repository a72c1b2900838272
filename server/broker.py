"""A local MQTT broker for demos and tests: mosquitto when it is on PATH, else the embedded amqtt broker.

Run the embedded one directly with ``python -m server.broker --host 127.0.0.1 --port 1883``.
amqtt speaks MQTT 3.1.1 only, so devices connected to it use their 3.1.1 fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Literal

import click

logger = logging.getLogger(__name__)

MOSQUITTO_CANDIDATES = ("mosquitto", "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
# How long to wait for a freshly started broker to accept TCP connections.
START_TIMEOUT_S = 15.0
# Grace period for a terminated broker before it is killed.
STOP_TIMEOUT_S = 5.0

BrokerKind = Literal["mosquitto", "amqtt"]


class BrokerStartError(Exception):
    """The broker process exited or never accepted connections."""


def mosquitto_binary() -> str | None:
    """Path of the mosquitto executable, or None when it is not installed."""
    for candidate in MOSQUITTO_CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_port(host: str, port: int, timeout: float = START_TIMEOUT_S) -> bool:
    """True once something accepts TCP connections on host:port, False after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def mosquitto_conf(host: str, port: int, data_dir: Path) -> str:
    """A mosquitto config for a loopback listener with persistence and no message size limit."""
    return (
        f"listener {port} {host}\n"
        "allow_anonymous true\n"
        "persistence true\n"
        f"persistence_location {data_dir}/\n"
        "max_queued_messages 100000\n"
        "max_inflight_messages 100\n"
        "message_size_limit 0\n"
    )


class LocalBroker:
    """A broker subprocess on ``host:port``; a context manager whose ``stop()`` is idempotent."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None, data_dir: Path | None = None,
                 prefer: BrokerKind | None = None) -> None:
        self.host = host
        self.port = port if port is not None else free_port(host)
        binary = mosquitto_binary()
        self.kind: BrokerKind = prefer or ("mosquitto" if binary else "amqtt")
        if self.kind == "mosquitto" and binary is None:
            raise BrokerStartError("mosquitto is not installed (apt install mosquitto)")
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="facegate-broker-")
            data_dir = Path(self._tmp.name)
        self.data_dir = data_dir
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> LocalBroker:
        """Start the broker and wait until it accepts connections."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.data_dir / f"{self.kind}.log", "ab")  # the child keeps its own copy of the fd
        if self.kind == "mosquitto":
            conf = self.data_dir / "mosquitto.conf"
            conf.write_text(mosquitto_conf(self.host, self.port, self.data_dir), encoding="utf-8")
            binary = mosquitto_binary()
            assert binary is not None  # noqa: S101 - checked in __init__
            args = [binary, "-c", str(conf)]
        else:
            args = [sys.executable, "-m", "server.broker", "--host", self.host, "--port", str(self.port)]
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log)  # noqa: S603
        log.close()
        if not wait_port(self.host, self.port):
            self.stop()
            raise BrokerStartError(f"{self.kind} did not listen on {self.host}:{self.port} within "
                                   f"{START_TIMEOUT_S}s; see {self.data_dir}")
        logger.info("%s broker listening on %s:%d", self.kind, self.host, self.port)
        return self

    def stop(self) -> None:
        """Terminate the broker (safe to call twice)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT_S)

    def close(self) -> None:
        """Stop the broker and delete its temporary folder (safe to call twice)."""
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def amqtt_config(host: str, port: int) -> dict[str, object]:
    """The embedded broker's config: one TCP listener, anonymous access, no $SYS or packet logging."""
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }


async def _serve(host: str, port: int) -> None:
    from amqtt.broker import Broker

    broker = Broker(amqtt_config(host, port))
    await broker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    logger.info("amqtt broker listening on %s:%d", host, port)
    await stop.wait()
    with contextlib.suppress(Exception):
        await broker.shutdown()


@click.command("broker")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=1883, show_default=True, type=click.IntRange(1, 65535), help="TCP port.")
def main(host: str, port: int) -> None:
    """Run the embedded amqtt broker until SIGTERM/SIGINT."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("transitions").setLevel(logging.WARNING)
    asyncio.run(_serve(host, port))


if __name__ == "__main__":
    main()
