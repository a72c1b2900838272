"""Helpers shared by the server tests: configs built through the real pydantic model, logins, simulated
devices that publish real MQTT messages with paho (QoS 1), and test images."""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import paho.mqtt.client as paho
from fastapi.testclient import TestClient
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import text

from core.protocol.schemas import (
    BundleAck,
    EventPayload,
    GalleryDelta,
    LivenessPayload,
    StatusPayload,
    VersionsPayload,
)
from core.protocol.topics import Topics
from core.types import DecisionKind, LivenessVerdict
from device.waiting import WaitTimeout, wait_progress
from server.auth.service import Role, create_user
from server.config import ServerConfig
from server.db.session import Database
from server.state import AppState

ADMIN_PASSWORD = "admin-password-for-tests"
VIEWER_PASSWORD = "viewer-password-for-tests"
PREFIX, SITE = "facegate", "testsite"
# Only so that a broken subscriber fails a test instead of hanging it; never a performance claim.
DEADLINE_S = 120.0
CONNECT_S = 60.0  # a hang guard for broker connections


def make_config(tmp_path: Path, db_url: str | None = None, **sections: Any) -> ServerConfig:
    """A server config in ``tmp_path`` with a bootstrap admin; MQTT off unless ``mqtt=`` is given; the
    database is ``db_url`` (the ``db_url`` fixture) or SQLite in ``tmp_path``."""
    data: dict[str, Any] = {
        "data_dir": str(tmp_path / "server"),
        "mqtt": {"enabled": False, "prefix": PREFIX, "site": SITE},
        "auth": {"bootstrap_password": ADMIN_PASSWORD},
    }
    if db_url is not None:
        data["database"] = {"url": db_url}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return ServerConfig.model_validate(data)


def delta_opener(client: TestClient) -> Callable[[GalleryDelta], GalleryDelta]:
    """Opens a sealed gallery delta with the site's gallery key, as the doors do (the server holds the key;
    tests of delta *content* read it this way, the broker only ever sees the sealed form)."""
    from core.protocol.sealed import open_delta
    from server.state import site_keyring

    state = state_of(client)
    keyring = site_keyring(state.config, state.cipher)

    def opened(delta: GalleryDelta) -> GalleryDelta:
        if delta.sealed is None or delta.key_version is None or keyring is None:
            return delta
        key = keyring.key(delta.key_version)
        assert key is not None, f"gallery key {delta.key_version} is not on the server"
        return open_delta(delta, key)

    return opened


def state_of(client: TestClient) -> AppState:
    """The AppState behind a TestClient's app."""
    state: AppState = client.app.state.facegate  # type: ignore[attr-defined]
    return state


def login(client: TestClient, username: str = "admin", password: str = ADMIN_PASSWORD) -> dict[str, str]:
    """Authorization headers for a fresh token."""
    response = client.post("/api/auth/login", json={"username": username, "password": password})
    assert response.status_code == 200, response.text
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


def add_viewer(client: TestClient, username: str = "viewer") -> dict[str, str]:
    """Create a viewer user and return its headers."""
    state = state_of(client)
    with state.db.transaction() as session:
        create_user(session, username, VIEWER_PASSWORD, Role.VIEWER)
    return login(client, username, VIEWER_PASSWORD)


def wait_until(predicate: Callable[[], bool], what: str, deadline_s: float = DEADLINE_S,
               progress: Callable[[], Hashable] | None = None) -> None:
    """Poll ``predicate`` until true; fail naming ``what`` once ``progress()`` stood still for
    ``deadline_s`` (without ``progress``: after ``deadline_s``)."""
    try:
        wait_progress(predicate, what, stall_s=deadline_s, progress=progress)
    except WaitTimeout as exc:
        raise AssertionError(str(exc)) from exc


def stored_bytes(db: Database) -> bytes:
    """Every byte the database holds on disk, for "never stored in plaintext" checks: the SQLite file and
    its WAL, or (PostgreSQL, after a CHECKPOINT) the database's data files and the cluster's WAL."""
    if db.is_sqlite:
        path = Path(db.engine.url.database or "")
        wal = path.with_name(path.name + "-wal")
        return path.read_bytes() + (wal.read_bytes() if wal.exists() else b"")
    with db.engine.connect() as conn:
        conn.execute(text("CHECKPOINT"))  # the throwaway cluster's role is its superuser
        data_dir = Path(str(conn.scalar(text("SELECT current_setting('data_directory')"))))
        oid = conn.scalar(text("SELECT oid FROM pg_database WHERE datname = current_database()"))
    files = [*sorted((data_dir / "base" / str(oid)).iterdir()), *sorted((data_dir / "pg_wal").glob("0*"))]
    return b"".join(f.read_bytes() for f in files if f.is_file())


# ---------------------------------------------------------------------------- simulated devices


def event_payload(device: str, seq: int = 0, kind: DecisionKind = DecisionKind.GRANTED,
                  person_id: str | None = "p1", name: str | None = "Ada", score: float = 0.8,
                  ts: dt.datetime | None = None, event_id: uuid.UUID | None = None) -> EventPayload:
    """A valid event as a door would publish it."""
    return EventPayload(event_id=event_id or uuid.uuid4(), seq=seq, ts=ts or dt.datetime.now(dt.UTC),
                        device=device, decision=kind, person_id=person_id, name=name, score=score, margin=0.2,
                        liveness=LivenessPayload(verdict=LivenessVerdict.SKIPPED))


def status_payload(device: str, bundle: int | None = None, delta: int = 0) -> StatusPayload:
    """A retained status message."""
    return StatusPayload(device=device, ts=dt.datetime.now(dt.UTC), uptime_s=12.0, fps=9.5, door="locked",
                         versions=VersionsPayload(software="0.1.0", model="dlib-int8", gallery="g1",
                                                  bundle_sequence=bundle, delta_sequence=delta))


def delta_ack(device: str, delta_sequence: int, state: str = "applied", bundle: int = 0) -> BundleAck:
    """A device's ack of a gallery delta."""
    return BundleAck(device=device, sequence=bundle, state="installed" if bundle else "idle",
                     delta_sequence=delta_sequence, delta_state=state,
                     ts=dt.datetime.now(dt.UTC))


class SimDevice:
    """A door's MQTT side: a real paho client publishing at QoS 1, with an availability last will."""

    def __init__(self, host: str, port: int, device_id: str, topics: Topics | None = None) -> None:
        self.device_id = device_id
        self.topics = topics or Topics(PREFIX, SITE)
        client_id = f"sim-{device_id}-{uuid.uuid4().hex[:6]}"
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311)
        self.client.max_inflight_messages_set(100)
        self.client.max_queued_messages_set(0)
        self.client.will_set(self.topics.available(device_id), b"offline", qos=1, retain=True)
        self._connected = threading.Event()
        self.client.on_connect = lambda *_args: self._connected.set()
        self.client.connect(host, port, keepalive=30)
        self.client.loop_start()
        if not self._connected.wait(CONNECT_S):
            raise AssertionError(f"simulated device {device_id} could not connect")
        self.infos: list[paho.MQTTMessageInfo] = []

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """Publish at QoS 1 and remember the handle."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        self.infos.append(info)

    def event(self, payload: EventPayload) -> None:
        """Publish an event."""
        self.publish(self.topics.events(self.device_id), payload.to_bytes())

    def online(self) -> None:
        """Retained availability 'online'."""
        self.publish(self.topics.available(self.device_id), b"online", retain=True)

    def status(self, payload: StatusPayload) -> None:
        """Retained status."""
        self.publish(self.topics.status(self.device_id), payload.to_bytes(), retain=True)

    def ack(self, payload: BundleAck) -> None:
        """Retained bundle/delta ack."""
        self.publish(self.topics.bundle_ack(self.device_id), payload.to_bytes(), retain=True)

    def flush(self, timeout: float = 60.0) -> None:
        """Wait while the broker keeps acknowledging; fail once no acknowledgement came for ``timeout``."""
        infos = self.infos
        wait_until(lambda: all(i.is_published() for i in infos),
                   f"the broker to acknowledge {self.device_id}'s {len(infos)} messages", timeout,
                   progress=lambda: sum(1 for i in infos if i.is_published()))
        self.infos = []

    def close(self) -> None:
        """Disconnect cleanly."""
        self.client.disconnect()
        self.client.loop_stop()


# ---------------------------------------------------------------------------- images


def png_bytes(rgb: np.ndarray[Any, Any]) -> bytes:
    """PNG encoding of an RGB array."""
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return bytes(buf.tobytes())


def jpeg_bytes(rgb: np.ndarray[Any, Any], quality: int = 92) -> bytes:
    """JPEG encoding of an RGB array."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return bytes(buf.tobytes())


def no_face_image(size: int = 256) -> np.ndarray[Any, Any]:
    """A smooth gradient with some texture and no face."""
    yy, xx = np.mgrid[0:size, 0:size]
    rgb = np.stack([xx % 256, yy % 256, (xx + yy) % 256], axis=-1).astype(np.uint8)
    return rgb


@contextmanager
def connected_server(tmp_path: Path, host: str, port: int, db_url: str | None = None,
                     **mqtt: Any) -> Iterator[TestClient]:
    """A server app with MQTT on (audit subscriber connected to host:port) and a bundle signing key;
    ``mqtt`` overrides more ``[mqtt]`` fields (site, TLS files)."""
    from server.app import create_app
    from server.bundles.signing import generate_key

    config = make_config(tmp_path, db_url, mqtt={"enabled": True, "host": host, "port": port,
                                                 "client_id": "server-under-test", **mqtt})
    generate_key(config.signing_key_path)
    with TestClient(create_app(config)) as test_client:
        state = state_of(test_client)
        assert state.source is not None and state.source.wait_connected(CONNECT_S)
        yield test_client
