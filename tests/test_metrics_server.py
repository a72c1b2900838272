"""The server's ``/metrics`` and ``/healthz``: a real app on real mosquitto with the built models enrolls
the astronaut, a simulated door publishes events, a deletion waits for its ack; every figure is read back
through prometheus_client's parser. ``/healthz`` turns 503 when the database stops answering."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from skimage import data

from device.types import DecisionKind
from server.app import create_app
from server.bundles.signing import generate_key
from tests.conftest import Broker
from tests.metrics_kit import value
from tests.mqtt_kit import CONNECT_S
from tests.server_support import (
    SimDevice,
    event_payload,
    jpeg_bytes,
    login,
    make_config,
    state_of,
    wait_until,
)

P = "facegate_server"
NAME = "Astro Naut"


def scrape(client: TestClient) -> tuple[str, dict[str, Metric]]:
    """GET /metrics without credentials; the text and its families by name."""
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return response.text, {f.name: f for f in text_string_to_metric_families(response.text)}


def counter(families: dict[str, Metric], name: str, **labels: str) -> float:
    """A counter's ``_total`` sample."""
    return value(families, name, f"{name}_total", **labels)


def events(families: dict[str, Metric], kind: str) -> float:
    """Stored audit events of one kind."""
    return counter(families, f"{P}_audit_events", kind=kind)


@pytest.fixture()
def client(tmp_path: Path, mosquitto: Broker, built_models: Path) -> Iterator[TestClient]:
    config = make_config(tmp_path, models={"dir": str(built_models)},
                         mqtt={"enabled": True, "host": mosquitto.host, "port": mosquitto.port,
                               "client_id": "server-metrics"})
    generate_key(config.signing_key_path)  # gallery deltas are published, so deletions wait for acks
    with TestClient(create_app(config)) as test_client:
        state = state_of(test_client)
        assert state.source is not None and state.source.wait_connected(CONNECT_S)
        yield test_client


def test_metrics_follow_enrollment_events_and_deletion(client: TestClient, mosquitto: Broker) -> None:
    health = client.get("/healthz")
    assert health.status_code == 200 and health.json() == {"status": "ok", "db": True, "mqtt": True}
    _, before = scrape(client)
    assert value(before, f"{P}_persons") == 0 and counter(before, f"{P}_enrollments") == 0
    assert value(before, f"{P}_mqtt_connected") == 1 and value(before, f"{P}_database_up") == 1
    assert value(before, f"{P}_bundle_sequence") == 0 and value(before, f"{P}_gallery_delta_sequence") == 0

    enrolled = client.post("/api/enroll", headers=login(client),
                           files=[("images", ("a.jpg", jpeg_bytes(data.astronaut()), "image/jpeg"))],
                           data={"name": NAME, "consent": "true"})
    assert enrolled.status_code == 201, enrolled.text
    person_id = enrolled.json()["person"]["id"]
    _, after_enroll = scrape(client)
    assert value(after_enroll, f"{P}_persons") == 1
    assert counter(after_enroll, f"{P}_enrollments") == 1
    assert counter(after_enroll, f"{P}_enrollment_images", outcome="accepted") == 1
    assert value(after_enroll, f"{P}_gallery_delta_sequence") == 1

    door = SimDevice(mosquitto.host, mosquitto.port, "door-1")
    try:
        door.online()
        granted = event_payload("door-1", seq=1, person_id=person_id, name=NAME)
        door.event(granted)
        door.event(granted)  # redelivered: stored once, counted as a duplicate
        for seq in (2, 3):
            door.event(event_payload("door-1", seq=seq, kind=DecisionKind.UNKNOWN, person_id=None, name=None))
        door.event(event_payload("door-1", seq=4, kind=DecisionKind.SPOOF, person_id=None, name=None))
        door.flush()

        def stored() -> bool:
            _, families = scrape(client)
            return (events(families, "spoof") == 1 and events(families, "unknown") == 2
                    and value(families, f"{P}_devices_online") == 1)

        wait_until(stored, "the events and the door's availability in the metrics")
        deletion = client.delete(f"/api/persons/{person_id}?wait_s=0", headers=login(client))
        assert deletion.status_code == 202 and deletion.json()["status"] == "pending"
    finally:
        door.close()

    text, families = scrape(client)
    assert events(families, "granted") == 1 and events(families, "denied") == 0
    assert counter(families, f"{P}_audit_duplicates") == 1
    assert value(families, f"{P}_persons") == 0 and value(families, f"{P}_devices") == 1
    assert value(families, f"{P}_deletion_acks_pending") == 1
    assert value(families, f"{P}_deletions_pending") == 1
    assert value(families, f"{P}_gallery_delta_sequence") == 2
    requests = f"{P}_http_requests"
    assert counter(families, requests, method="POST", route="/api/enroll", status="201") == 1
    assert counter(families, requests, method="DELETE", route="/api/persons/{person_id}", status="202") == 1
    assert value(families, f"{P}_http_request_duration_seconds", f"{P}_http_request_duration_seconds_count",
                 method="POST", route="/api/enroll") == 1
    # Route templates only: no person id, name or token reaches the metrics.
    assert person_id not in text and "Astro" not in text and "fg_" not in text


def test_healthz_is_503_when_the_database_is_gone(tmp_path: Path) -> None:
    db_dir = tmp_path / "db"
    config = make_config(tmp_path, database={"url": f"sqlite:///{db_dir / 'facegate.db'}"})
    with TestClient(create_app(config, start_mqtt=False)) as client:
        assert client.get("/healthz").json() == {"status": "ok", "db": True, "mqtt": None}
        assert client.get("/nowhere/42").status_code == 404
        _, families = scrape(client)
        requests = f"{P}_http_requests"
        assert counter(families, requests, method="GET", route="<unrouted>", status="404") == 1
        assert f"{P}_mqtt_connected" not in families  # MQTT off: no gauge rather than a false 0

        state_of(client).db.engine.dispose()
        shutil.rmtree(db_dir)  # SQLite cannot open a file in a folder that no longer exists
        health = client.get("/healthz")
        assert health.status_code == 503
        assert health.json() == {"status": "unavailable", "db": False, "mqtt": None}
        _, families = scrape(client)  # still served: the database part reports itself down
        assert value(families, f"{P}_database_up") == 0 and f"{P}_persons" not in families
