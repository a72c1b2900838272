"""What ``facegate bench fleet`` starts: brokers, the database and the server processes.

- One central mosquitto, and one mosquitto per site bridged to it with the product's own stanza
  (:func:`server.bridge.bridge_conf`, plain TCP on loopback): the doors talk to their site broker, the
  servers to the central one, exactly as in ``tests/test_bridge.py``.
- The database: a SQLite file, or a throwaway PostgreSQL cluster (:class:`server.db.cluster.LocalPostgres`).
- The servers: ``python -m facegate server run --config <toml>`` processes, migrated once first
  (``facegate server migrate``). A server serves one site (``[mqtt] site``: its topics, its doors'
  receipts, its gallery keys), so each site gets its own replica set of ``servers`` processes on the
  central broker; a set of more than one shares the site's ingest through ``[mqtt] share_group`` (MQTT v5
  shared subscriptions). Every process writes to the one database.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from core.mqtt.client import ClientSettings, Message, MqttClient
from core.protocol.topics import Topics
from server.bridge import bridge_conf
from server.broker import BrokerStartError, LocalBroker, free_port

logger = logging.getLogger(__name__)

PREFIX = "facegate"
BRIDGE_UP_TIMEOUT_S = 30.0  # the bridge connects at once to a central broker that is already up
# A server process imports FastAPI, SQLAlchemy and numpy and migrates the database: slow on 2 busy cores.
SERVER_READY_TIMEOUT_S = 180.0
SERVER_STOP_TIMEOUT_S = 15.0  # SIGTERM: uvicorn finishes the lifespan (the audit writer's last batch)
MIGRATE_TIMEOUT_S = 300.0
HTTP_TIMEOUT_S = 2.0
POLL_S = 0.2
LOG_TAIL_LINES = 8
SERVER_LOG_LEVEL = "INFO"  # each replica's log (servers/<site>/<n>/server.log) says what it did
# Counters of the audit writer on each replica's /metrics: what that replica inserted and absorbed.
STORED_METRIC = re.compile(r"^facegate_server_audit_events_total\{[^}]*\} ([0-9.eE+]+)$", re.M)
DUPLICATE_METRIC = re.compile(r"^facegate_server_audit_duplicates_total ([0-9.eE+]+)$", re.M)


class RigError(Exception):
    """A broker, the database or a server process did not come up."""


def site_names(sites: int) -> list[str]:
    """The bench's site ids."""
    return [f"site-{i + 1}" for i in range(sites)]


class Brokers:
    """The central broker and one bridged broker per site; a context manager, ``close()`` idempotent."""

    def __init__(self, workdir: Path, sites: list[str]) -> None:
        self.workdir = workdir
        self.sites = sites
        self.central: LocalBroker | None = None
        self.site: dict[str, LocalBroker] = {}

    def start(self) -> Brokers:
        """Central first (the bridges connect to it at once), then each site; wait for every bridge."""
        try:
            folder = self.workdir / "brokers"
            self.central = LocalBroker(data_dir=folder / "central", prefer="mosquitto").start()
            for site in self.sites:
                stanza = bridge_conf(Topics(PREFIX, site), f"127.0.0.1:{self.central.port}", None)
                broker = LocalBroker(data_dir=folder / site, prefer="mosquitto", extra_config=stanza)
                self.site[site] = broker.start()
                self._wait_bridge(site, broker)
        except BrokerStartError as exc:
            self.close()
            raise RigError(f"broker: {exc}") from exc
        except BaseException:
            self.close()
            raise
        return self

    def _wait_bridge(self, site: str, broker: LocalBroker) -> None:
        """The bridge's retained notification at the site broker says 1 once it is connected."""
        up = threading.Event()

        def seen(message: Message) -> None:
            if message.payload == b"1":
                up.set()

        with MqttClient(ClientSettings(host=broker.host, port=broker.port,
                                       client_id=f"bench-bridge-watch-{site}")) as client:
            client.subscribe(Topics(PREFIX, site).bridge_state, seen, qos=1)
            if not up.wait(BRIDGE_UP_TIMEOUT_S):
                raise RigError(f"the bridge of {site} did not come up within {BRIDGE_UP_TIMEOUT_S:.0f} s; "
                               f"see {broker.data_dir / 'mosquitto.log'}")

    def close(self) -> None:
        """Stop every broker (sites first)."""
        for broker in self.site.values():
            broker.close()
        self.site = {}
        if self.central is not None:
            self.central.close()
            self.central = None

    def __enter__(self) -> Brokers:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


@dataclass
class Replica:
    """One server process: its site, its MQTT client id, its HTTP port, its config and log."""

    site: str
    index: int
    client_id: str
    http_port: int
    config: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def name(self) -> str:
        """``<site>/<index>``."""
        return f"{self.site}/{self.index}"

    def get(self, path: str) -> str:
        """GET ``path`` from this replica's HTTP port (loopback)."""
        url = f"http://127.0.0.1:{self.http_port}{path}"
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
            return str(response.read().decode("utf-8"))

    def ready(self) -> bool:
        """True once /healthz says the database answers and the audit subscriber is connected."""
        try:
            health = json.loads(self.get("/healthz"))
        except (OSError, urllib.error.URLError, ValueError):
            return False
        return bool(health.get("db")) and health.get("mqtt") is True

    def audit_counts(self) -> tuple[int, int]:
        """(events this replica inserted, duplicates it absorbed), from its /metrics."""
        text = self.get("/metrics")
        stored = sum(float(v) for v in STORED_METRIC.findall(text))
        duplicates = sum(float(v) for v in DUPLICATE_METRIC.findall(text))
        return int(stored), int(duplicates)

    def log_tail(self) -> str:
        """The last lines of the process's log."""
        try:
            lines = self.log.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(lines[-LOG_TAIL_LINES:])


def _toml(value: str | int | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def server_toml(data_dir: Path, database_url: str, http_port: int, mqtt: dict[str, str | int | bool]) -> str:
    """A bench server config: its site's data_dir, the shared database, loopback HTTP, the central broker."""
    lines = [f"data_dir = {_toml(str(data_dir))}", "", "[http]", 'host = "127.0.0.1"',
             f"port = {http_port}", "", "[database]", f"url = {_toml(database_url)}", "", "[mqtt]"]
    lines += [f"{key} = {_toml(value)}" for key, value in mqtt.items()]
    return "\n".join(lines) + "\n"


class ServerFleet:
    """``servers`` replicas per site on the central broker, one database; ``close()`` idempotent."""

    def __init__(self, workdir: Path, database_url: str, broker_port: int, sites: list[str],
                 servers: int) -> None:
        self.workdir = workdir
        self.database_url = database_url
        self.broker_port = broker_port
        self.replicas: list[Replica] = []
        # Secrets through the environment, as in production; every replica shares the chip key because
        # they share the database.
        from server.crypto import generate_key_text

        self.env = {**os.environ, "FACEGATE_SERVER__CRYPTO__CHIP_KEY": generate_key_text(),
                    "FACEGATE_SERVER__AUTH__BOOTSTRAP_PASSWORD": secrets.token_urlsafe(18)}
        for site in sites:
            # A site's replicas share its data_dir (bundles, delta ledger, gallery keys), as deployed.
            data_dir = workdir / "servers" / site / "data"
            for index in range(servers):
                client_id = f"fleet-{site}-{index + 1}"
                folder = workdir / "servers" / site / str(index + 1)
                folder.mkdir(parents=True)
                mqtt: dict[str, str | int | bool] = {"enabled": True, "host": "127.0.0.1",
                                                     "port": broker_port, "prefix": PREFIX, "site": site,
                                                     "client_id": client_id}
                if servers > 1:
                    mqtt["share_group"] = f"fleet-{site}"
                port = free_port()
                config = folder / "server.toml"
                config.write_text(server_toml(data_dir, database_url, port, mqtt), encoding="utf-8")
                self.replicas.append(Replica(site, index + 1, client_id, port, config, folder / "server.log"))

    def _facegate(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "facegate", "--log-level", SERVER_LOG_LEVEL, *args]

    def migrate(self) -> None:
        """``facegate server migrate`` once, before any replica starts."""
        done = subprocess.run(self._facegate("server", "migrate", "--config", str(self.replicas[0].config)),  # noqa: S603
                              env=self.env, capture_output=True, text=True, timeout=MIGRATE_TIMEOUT_S,
                              check=False)
        if done.returncode != 0:
            tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-LOG_TAIL_LINES:])
            raise RigError(f"facegate server migrate failed ({done.returncode}): {tail}")

    def start(self) -> ServerFleet:
        """Migrate, then start the replicas one after another (the first creates the bootstrap admin)."""
        try:
            self.migrate()
            for replica in self.replicas:
                self._start(replica)
        except BaseException:
            self.close()
            raise
        return self

    def _start(self, replica: Replica) -> None:
        with open(replica.log, "ab") as log:  # the child keeps its own copy of the descriptor
            replica.proc = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
                self._facegate("server", "run", "--config", str(replica.config)),
                env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + SERVER_READY_TIMEOUT_S
        while not replica.ready():
            code = replica.proc.poll()
            if code is not None:
                raise RigError(f"server {replica.name} exited with code {code}: {replica.log_tail()}")
            if time.monotonic() > deadline:
                raise RigError(f"server {replica.name} not ready within {SERVER_READY_TIMEOUT_S:.0f} s: "
                               f"{replica.log_tail()}")
            time.sleep(POLL_S)
        logger.info("server %s ready (http %d, client id %s)", replica.name, replica.http_port,
                    replica.client_id)

    def exited(self) -> list[str]:
        """Replicas whose process has exited (empty while all run)."""
        return [r.name for r in self.replicas if r.proc is None or r.proc.poll() is not None]

    def close(self) -> None:
        """SIGTERM every replica, then kill what has not exited in time (safe to call twice)."""
        running = [r for r in self.replicas if r.proc is not None and r.proc.poll() is None]
        for replica in running:
            assert replica.proc is not None  # noqa: S101 - filtered above
            replica.proc.send_signal(signal.SIGTERM)
        for replica in running:
            assert replica.proc is not None  # noqa: S101 - filtered above
            try:
                replica.proc.wait(SERVER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                logger.warning("server %s did not stop in %.0f s; killing it", replica.name,
                               SERVER_STOP_TIMEOUT_S)
                replica.proc.kill()
                replica.proc.wait(SERVER_STOP_TIMEOUT_S)
