"""The running pieces of the demo: the companion server on a loopback port, its HTTP API as a client
uses it, one door agent wired as ``facegate device run`` wires it, and the signed bundle the server ships.

The broker is :class:`server.broker.LocalBroker`; everything else is the project's own code, started
in this process so the demo can tell when a scene has been seen and every event has arrived.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import httpx

from core.mqtt.client import MqttClient
from core.protocol.topics import Topics
from device.agent.loop import Agent
from device.agent.runner import build_agent
from device.bundles.updater import BundleUpdater
from device.camera import FrameSource
from device.config import DeviceConfig, GalleryConfig
from device.kiosk.server import KioskServer, start_kiosk
from device.mqtt.runtime import bundle_loader, make_delta_live, open_store
from device.mqtt.service import DeviceMqtt
from device.waiting import WaitTimeout, wait_progress
from models.runtime.manifest import load_manifest
from server.app import app_state, create_app
from server.bundles.builder import BuiltBundle, build_bundle
from server.bundles.gallery_export import export_gallery
from server.bundles.rollout import RolloutTracker, installed
from server.bundles.signing import load_private_key
from server.bundles.sitekeys import DoorKeyState, GallerySealer
from server.config import ServerConfig
from server.state import AppState, site_keyring

logger = logging.getLogger(__name__)

# Waits fail only when nothing moved for this long (a hang), never because a busy machine is slow.
START_STALL_S = 120.0  # a server, subscriber or camera that shows no sign of starting
HTTP_TIMEOUT_S = 300.0  # one HTTP request (enrolment embeds photos; DELETE waits for the doors itself)
INSTALL_STALL_S = 120.0  # the door's bundle acks (progress every 10 %, then verifying, installed)
POLL_S = 0.02  # in-process counters are cheap to look at
HTTP_POLL_S = 0.25  # a wait that asks the HTTP API


class DemoError(Exception):
    """A demo stage failed; the message says which and why."""


def wait_until(predicate: Callable[[], bool], what: str, stall_s: float = START_STALL_S,
               progress: Callable[[], Hashable] | None = None, poll_s: float = POLL_S) -> None:
    """Wait until ``predicate`` holds; raise DemoError naming ``what`` once ``progress`` (a counter the
    wait can watch) has not moved for ``stall_s`` seconds, or after ``stall_s`` without one."""
    try:
        wait_progress(predicate, what, stall_s=stall_s, progress=progress, poll_s=poll_s)
    except WaitTimeout as exc:
        raise DemoError(str(exc)) from exc


class ServerRunner:
    """``create_app`` served by uvicorn in a thread, as ``facegate server run`` serves it."""

    def __init__(self, config: ServerConfig) -> None:
        import uvicorn

        self.config = config
        self.app = create_app(config)
        # log_config=None keeps facegate's logging, as `facegate server run` does.
        self._server = uvicorn.Server(uvicorn.Config(self.app, host=config.http.host, port=config.http.port,
                                                     log_config=None, access_log=False))
        self._thread = threading.Thread(target=self._server.run, name="demo-server", daemon=True)

    @property
    def url(self) -> str:
        """Base URL of the API and the web station."""
        return f"http://{self.config.http.host}:{self.config.http.port}"

    @property
    def state(self) -> AppState:
        """Database, engine, sync and audit subscriber of the running app."""
        return app_state(self.app)

    def start(self) -> ServerRunner:
        """Serve, and wait until HTTP answers and the audit subscriber is subscribed."""
        self._thread.start()
        wait_until(lambda: self._server.started or not self._thread.is_alive(), "the server to start")
        if not self._server.started:
            raise DemoError("the server stopped during start-up (see the log)")
        source = self.state.source
        if source is None or not source.wait_connected(START_STALL_S):
            raise DemoError("the server's audit subscriber did not connect to the broker")
        return self

    def close(self) -> None:
        """Stop serving (runs the app's shutdown: audit subscriber, engine, database); idempotent."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=10)


class Api:
    """The server's HTTP API as an operator's script uses it: log in, enroll, list devices, delete."""

    def __init__(self, base_url: str, username: str, password: str) -> None:
        self._http = httpx.Client(base_url=base_url, timeout=HTTP_TIMEOUT_S)
        response = self._http.post("/api/auth/login", json={"username": username, "password": password})
        self._check(response, "log in")
        self._http.headers["Authorization"] = f"Bearer {response.json()['access_token']}"

    @staticmethod
    def _check(response: httpx.Response, what: str) -> None:
        if response.is_error:
            raise DemoError(f"could not {what}: HTTP {response.status_code} {response.text[:500]}")

    def enroll(self, name: str, photos: list[bytes]) -> dict[str, Any]:
        """POST /api/enroll with consent; return the response (person, per-image results)."""
        files = [("images", (f"{name}-{i}.jpg", data, "image/jpeg")) for i, data in enumerate(photos)]
        response = self._http.post("/api/enroll", files=files, data={"name": name, "consent": "true"})
        self._check(response, f"enroll {name!r}")
        body: dict[str, Any] = response.json()
        return body

    def devices(self) -> list[dict[str, Any]]:
        """GET /api/devices."""
        response = self._http.get("/api/devices")
        self._check(response, "list devices")
        rows: list[dict[str, Any]] = response.json()
        return rows

    def event_count(self, device_id: str) -> int:
        """How many of the door's events the audit log holds (GET /api/events)."""
        response = self._http.get("/api/events", params={"device_id": device_id, "limit": 1})
        self._check(response, "list events")
        return int(response.json()["total"])

    def delete(self, person_id: str, wait_s: float) -> dict[str, Any]:
        """DELETE /api/persons/{id}: purge now, answer once every door confirmed (or after ``wait_s``)."""
        response = self._http.delete(f"/api/persons/{person_id}", params={"wait_s": wait_s})
        self._check(response, f"delete person {person_id}")
        body: dict[str, Any] = response.json()
        return body

    def deletion(self, deletion_id: str) -> dict[str, Any]:
        """GET /api/deletions/{id}: a deletion request and each door's confirmation."""
        response = self._http.get(f"/api/deletions/{deletion_id}")
        self._check(response, f"read deletion {deletion_id}")
        body: dict[str, Any] = response.json()
        return body

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()


class DoorRunner:
    """One door: agent, MQTT side and bundle updater, wired as ``device.agent.compose.run_door`` does."""

    def __init__(self, config: DeviceConfig, source: FrameSource | None = None) -> None:
        self.config = config
        store = open_store(config)
        if store is None:
            raise DemoError("the demo door needs bundles enabled")
        store.recover()
        self.agent: Agent = build_agent(config, loader=bundle_loader(config, store), source=source)
        self.mqtt = DeviceMqtt(config, self.agent)
        self.agent.add_sink(self.mqtt.sink)
        self.updater = BundleUpdater(self.mqtt.client, self.mqtt.topics, config.device.id, store,
                                     config.bundle, on_installed=self._reload,
                                     on_gallery_changed=make_delta_live(self.agent))
        self.mqtt.attach_updater(self.updater)
        self.kiosk: KioskServer | None = None

    def describe(self) -> str:
        """Where the door stands, for an error message: connection, protocol, last bundle ack."""
        client, ack = self.mqtt.client, self.updater.last_ack
        link = f"connected over MQTT {'5' if client.protocol_version == 5 else '3.1.1'}" if client.connected \
            else f"NOT connected (trying MQTT {'5' if client.protocol_version == 5 else '3.1.1'})"
        return (f"{self.config.device.id} {link}, last ack: bundle {ack.sequence} {ack.state} "
                f"{ack.percent:.0f} %, running {ack.running_sequence}")

    def _reload(self, _bundle: object) -> None:
        self.agent.reload()

    def start(self) -> DoorRunner:
        """Connect, listen for bundles and deltas, serve the door screen, start the camera and processing."""
        self.mqtt.start()
        self.updater.start()
        self.kiosk = start_kiosk(self.agent, online=lambda: self.mqtt.client.connected)
        self.agent.start()
        return self

    def close(self) -> None:
        """Stop the agent (door locked), its screen, the updater and the MQTT side; idempotent."""
        self.agent.stop()
        if self.kiosk is not None:
            self.kiosk.close()
        self.updater.close()
        self.mqtt.close()


def _sealer_for(state: AppState, device_id: str) -> GallerySealer | None:
    """The site's gallery key with its wraps, once the door's hello has put its key in the keyring."""
    keyring = site_keyring(state.config, state.cipher)
    if keyring is None:
        return None
    try:
        wait_progress(lambda: keyring.doors().get(device_id, {}).get("state") == DoorKeyState.TRUSTED,
                      f"{device_id} to report its public key", stall_s=INSTALL_STALL_S)
    except WaitTimeout as exc:
        raise DemoError(f"{device_id} never reported its key, so the bundle cannot be sealed to it: "
                        f"{exc}") from exc
    return keyring.sealer()


def ship_bundle(state: AppState, models_dir: Path, work: Path, client: MqttClient, topics: Topics,
                device_id: str) -> BuiltBundle:
    """Export the enrolled templates, build and sign a bundle, publish it, wait until the door runs it."""
    config = state.config
    model_sha = state.engine.model_sha256
    version = next((e.version for e in load_manifest(models_dir).models if e.sha256 == model_sha), "")
    gallery_dir = work / "gallery-export"
    try:
        with state.db.session() as session:
            export_gallery(session, state.cipher, model_sha, gallery_dir, config=GalleryConfig(),
                           model_version=version)
        key = load_private_key(config.signing_key_path)
        built = build_bundle(models_dir, gallery_dir, config.bundles_root, key,
                             sealer=_sealer_for(state, device_id))
    finally:
        shutil.rmtree(gallery_dir, ignore_errors=True)  # embeddings: the bundle holds its own copy
    seq = built.manifest.sequence
    bundles = state.bundles
    if bundles is None:
        raise DemoError("the server does not serve bundles (MQTT or its signing key is missing)")
    # The server's own bundle server publishes, answers chunk requests and offers the announcement again.
    with RolloutTracker(client, topics) as tracker:

        def door() -> tuple[object, ...]:
            row = tracker.snapshot().get(device_id)
            ack = row.ack if row is not None else None
            return (ack.sequence, ack.state, ack.percent, ack.running_sequence) if ack else ("no ack",)

        try:
            bundles.publish(built, wait=True)
            wait_progress(lambda: device_id in installed(tracker.snapshot(), seq),
                          f"{device_id} to install bundle {seq}", stall_s=INSTALL_STALL_S, progress=door)
        except WaitTimeout as exc:
            raise DemoError(f"{device_id} did not install bundle {seq}: {exc}") from exc
    return built
