"""A local MQTT broker for demos and tests: mosquitto when it is on PATH, else the embedded amqtt broker.

Run the embedded one directly with ``python -m server.broker --host 127.0.0.1 --port 1883``.
amqtt speaks MQTT 3.1.1 only and keeps nothing across a restart (no persistence), so devices connected
to it use their 3.1.1 fallback and the server re-offers what a door must have (see
:mod:`server.bundles.offers`).

Which broker: ``FACEGATE_BROKER=amqtt`` forces the embedded one, ``FACEGATE_BROKER=mosquitto`` requires
mosquitto; unset, mosquitto is used when ``shutil.which("mosquitto")`` finds it on PATH (Debian installs
it in /usr/sbin, which is on root's PATH but not on a plain user's).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import click

logger = logging.getLogger(__name__)

BROKER_ENV = "FACEGATE_BROKER"
# How long a freshly started broker that is still running may take to accept TCP connections. A broker
# that exits fails at once; this bound only catches a hung one (amqtt imports take seconds under load).
START_TIMEOUT_S = 120.0
# Grace period for a terminated broker before it is killed.
STOP_TIMEOUT_S = 5.0

MQTT_311_LEVEL = 4  # the CONNECT protocol level of MQTT 3.1.1, the only one amqtt speaks
KEEPALIVE_GRACE = 1.5  # MQTT 3.1.1 3.1.2.10: a silent client is dropped after 1.5 keep-alive periods

BrokerKind = Literal["mosquitto", "amqtt"]


class BrokerStartError(Exception):
    """The broker process exited or never accepted connections."""


def mosquitto_binary() -> str | None:
    """Path of mosquitto on PATH, or None (a PATH without mosquitto means the embedded broker)."""
    return shutil.which("mosquitto")


def requested_kind() -> BrokerKind | None:
    """The broker ``FACEGATE_BROKER`` asks for (None: whichever is installed)."""
    value = os.environ.get(BROKER_ENV, "").strip().lower()
    if not value:
        return None
    if value == "amqtt":
        return "amqtt"
    if value == "mosquitto":
        return "mosquitto"
    raise BrokerStartError(f"{BROKER_ENV}={value!r}: expected 'amqtt' or 'mosquitto'")


def default_kind() -> BrokerKind:
    """The broker a :class:`LocalBroker` starts: ``FACEGATE_BROKER``, else mosquitto when on PATH."""
    return requested_kind() or ("mosquitto" if mosquitto_binary() else "amqtt")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_port(host: str, port: int, timeout: float = START_TIMEOUT_S,
              alive: Callable[[], bool] | None = None) -> bool:
    """True once something accepts TCP connections on host:port; False after ``timeout`` or as soon as
    ``alive()`` says the process that should listen there has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return True
        except OSError:
            if alive is not None and not alive():
                return False
            time.sleep(0.05)
    return False


def mosquitto_conf(host: str, port: int, data_dir: Path, persistence: bool = True) -> str:
    """A mosquitto config for a loopback listener, with persistence (or not); mosquitto's default packet
    size limit (none below the protocol's 256 MiB) lets whole bundle chunks through."""
    return (
        f"listener {port} {host}\n"
        "allow_anonymous true\n"
        f"persistence {'true' if persistence else 'false'}\n"
        f"persistence_location {data_dir}/\n"
        "max_queued_messages 100000\n"
        "max_inflight_messages 100\n"
        # As root, mosquitto would drop to the 'mosquitto' user, who cannot write a private temp folder.
        + ("user root\n" if os.geteuid() == 0 else "")
    )


class LocalBroker:
    """A broker subprocess on ``host:port`` that may be stopped and started again on the same port; a
    context manager whose ``stop()`` is idempotent. amqtt keeps nothing across a restart; mosquitto keeps
    sessions and retained messages unless ``persistence=False``. ``extra_config``: mosquitto config lines
    appended to the generated ones (a bridge stanza, see :mod:`server.bridge`); mosquitto only."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None, data_dir: Path | None = None,
                 prefer: BrokerKind | None = None, persistence: bool = True, extra_config: str = "") -> None:
        self.host = host
        self.extra_config = extra_config
        # amqtt never persists; mosquitto does unless told not to (a broker that forgets on restart)
        self.persistence = persistence
        self.port = port if port is not None else free_port(host)
        self.kind: BrokerKind = prefer or default_kind()
        if self.kind == "mosquitto" and mosquitto_binary() is None:
            raise BrokerStartError("mosquitto is not on PATH (apt install mosquitto; Debian puts it in "
                                   "/usr/sbin)")
        if extra_config and self.kind != "mosquitto":
            raise BrokerStartError("extra mosquitto config lines (e.g. a bridge) need mosquitto; the "
                                   "embedded amqtt broker cannot bridge")
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
            text = mosquitto_conf(self.host, self.port, self.data_dir, self.persistence)
            conf.write_text(text + (f"\n{self.extra_config}\n" if self.extra_config else ""),
                            encoding="utf-8")
            binary = mosquitto_binary()
            assert binary is not None  # noqa: S101 - checked in __init__
            args = [binary, "-c", str(conf)]
        else:
            args = [sys.executable, "-m", "server.broker", "--host", self.host, "--port", str(self.port)]
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log)  # noqa: S603
        self._proc = proc
        log.close()
        # The process must still run once the port answers: one that failed to bind while another
        # program holds the port would leave its clients talking to a stranger.
        if not wait_port(self.host, self.port, alive=lambda: proc.poll() is None) or proc.poll() is not None:
            code = proc.poll()
            self.stop()
            why = (f"exited with code {code}" if code is not None
                   else f"did not listen within {START_TIMEOUT_S:.0f} s")
            raise BrokerStartError(f"{self.kind} on {self.host}:{self.port} {why}; see "
                                   f"{self.data_dir / (self.kind + '.log')}")
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
    """The embedded broker's config: one TCP listener, open access with persistent sessions kept (see
    :class:`server.amqtt_plugins.LoopbackAuthPlugin`), no $SYS or packet logging."""
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": {"server.amqtt_plugins.LoopbackAuthPlugin": {}},
    }


def follow_mqtt_311() -> None:
    """Make the embedded amqtt broker follow three MQTT 3.1.1 rules it breaks (patched once per process).

    - A CONNECT of another protocol level gets CONNACK 0x01 (section 3.1.2.2). amqtt parses the whole
      CONNECT as 3.1.1 before it checks the level; an MQTT 5 CONNECT has property blocks that 3.1.1
      lacks, so one with a last will is mis-parsed, amqtt waits for bytes that never come and drops the
      client without a CONNACK. Skipping such a payload lets amqtt's own level check refuse it, and
      clients fall back to 3.1.1 at once.
    - A client is dropped only after one and a half keep-alive periods of silence (section 3.1.2.10).
      amqtt drops it after exactly one, which races the client's own PINGREQ on a busy machine.
    - Retained messages go only to a client subscribed to them (section 3.3.1.3). On every connect
      amqtt sends the new client the retained messages matching any filter *anyone* subscribed to.
    """
    from amqtt.broker import Broker
    from amqtt.mqtt.connect import ConnectPayload
    from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler

    if getattr(ConnectPayload, "_facegate_patched", False):
        return
    original_payload = ConnectPayload.from_stream.__func__
    original_connect = BrokerProtocolHandler.init_from_connect.__func__

    async def from_stream(cls: type[ConnectPayload], reader: Any, fixed_header: Any,
                          variable_header: Any) -> ConnectPayload:
        if variable_header is None or variable_header.proto_level == MQTT_311_LEVEL or fixed_header is None:
            payload: ConnectPayload = await original_payload(cls, reader, fixed_header, variable_header)
            return payload
        # name (2 + len), level (1), flags (1), keep-alive (2) were read as the variable header
        consumed = 2 + len(variable_header.proto_name.encode("utf-8")) + 4
        rest = fixed_header.remaining_length - consumed
        if rest > 0:
            await reader.read(rest)
        # Placeholders that pass amqtt's payload checks; the level check that follows refuses the client.
        return cls(client_id="unsupported-protocol-level", will_topic="-", will_message=b"-")

    async def init_from_connect(cls: type[BrokerProtocolHandler], *args: Any, **kwargs: Any) -> Any:
        handler, session = await original_connect(cls, *args, **kwargs)
        if session.keep_alive > 0:
            session.keep_alive = math.ceil(session.keep_alive * KEEPALIVE_GRACE)
        return handler, session

    original_retained = Broker._publish_retained_messages_for_subscription

    async def retained_for_subscribers(self: Broker, subscription: tuple[str, int], session: Any) -> None:
        subscribers = self._subscriptions.get(subscription[0], [])
        if any(s.client_id == session.client_id for s, _ in subscribers):
            await original_retained(self, subscription, session)

    ConnectPayload.from_stream = classmethod(from_stream)
    BrokerProtocolHandler.init_from_connect = classmethod(init_from_connect)
    Broker._publish_retained_messages_for_subscription = retained_for_subscribers
    ConnectPayload._facegate_patched = True


async def _serve(host: str, port: int) -> None:
    from amqtt.broker import Broker

    follow_mqtt_311()
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
