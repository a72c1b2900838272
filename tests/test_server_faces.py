"""Faces on the enrollment station through the API: thumbnails and chips decrypted on demand for admins
only, never cached, each view audited; and decisions per hour per door for the events chart."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient
from skimage import data

from server.app import create_app
from server.db.models import EventRow, Person
from tests.server_support import add_viewer, login, make_config, png_bytes, state_of


@pytest.fixture()
def client(tmp_path: Path, built_models: Path, db_url: str) -> Iterator[TestClient]:
    app = create_app(make_config(tmp_path, db_url, models={"dir": str(built_models)}))
    with TestClient(app) as test_client:
        yield test_client


def _views(client: TestClient, headers: dict[str, str]) -> int:
    return int(client.get("/api/audit", params={"action": "face_viewed"}, headers=headers).json()["total"])


def test_faces_are_decrypted_for_admins_only_uncached_and_audited(client: TestClient) -> None:
    admin = login(client)
    photo = png_bytes(cv2.resize(data.astronaut(), (400, 400)))
    body = client.post("/api/enroll", headers=admin, data={"name": "Ada Lovelace", "consent": "true"},
                       files={"images": ("ada.png", photo, "image/png")}).json()
    person = body["person"]["id"]
    chip_id = client.get(f"/api/persons/{person}/templates", headers=admin).json()[0]["chip_id"]
    before = _views(client, admin)
    for path in (f"/api/persons/{person}/thumbnail", f"/api/persons/{person}/chips/{chip_id}"):
        response = client.get(path, headers=admin)
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        assert response.headers["cache-control"] == "no-store"
        image = cv2.imdecode(np.frombuffer(response.content, np.uint8), cv2.IMREAD_COLOR)
        assert image.shape == (150, 150, 3)  # the aligned chip, decrypted
    entries = client.get("/api/audit", params={"action": "face_viewed"}, headers=admin).json()["items"]
    assert _views(client, admin) == before + 2 and entries[0]["person_id"] == person
    assert "Ada Lovelace" in entries[0]["detail"]
    viewer = add_viewer(client)
    assert client.get(f"/api/persons/{person}/thumbnail", headers=viewer).status_code == 403
    assert client.get(f"/api/persons/{person}/thumbnail").status_code == 401
    assert client.get(f"/api/persons/{person}/chips/{'0' * 32}", headers=admin).status_code == 404
    assert client.get(f"/api/persons/{person}/chips/not-hex", headers=admin).status_code == 422
    with state_of(client).db.transaction() as session:  # a person without a stored face
        bare = Person(name="No Photo", created_by="admin")
        session.add(bare)
        session.flush()
        bare_id = bare.id
    assert client.get(f"/api/persons/{bare_id}/thumbnail", headers=admin).status_code == 404
    assert _views(client, admin) == before + 2  # refusals and misses are not views


def test_decisions_per_hour_per_door(client: TestClient) -> None:
    now = dt.datetime.now(dt.UTC)
    placed = [("door-a", "granted", 0), ("door-a", "granted", 0), ("door-a", "unknown", 3),
              ("door-b", "spoof", 23), ("door-b", "granted", 30)]  # 30 h ago: outside the 24 h chart
    with state_of(client).db.transaction() as session:
        for device, kind, hours_ago in placed:
            session.add(EventRow(event_id=str(uuid.uuid4()), device_id=device, kind=kind,
                                 ts=now - dt.timedelta(hours=hours_ago), payload={}))
    viewer = add_viewer(client)  # viewers read events, and so the chart
    body = client.get("/api/events/hourly", headers=viewer).json()
    assert len(body["hours"]) == 24 and not body["truncated"]
    hours = [dt.datetime.fromisoformat(h) for h in body["hours"]]
    assert hours[-1] <= now < hours[-1] + dt.timedelta(hours=1)  # the current hour is the last
    counts = {d["device_id"]: d["counts"] for d in body["devices"]}
    assert counts["door-a"]["granted"][23] == 2 and counts["door-a"]["unknown"][20] == 1
    assert sum(counts["door-a"]["granted"]) == 2
    assert counts["door-b"] == {"spoof": [1] + [0] * 23}
    only_b = client.get("/api/events/hourly", params={"device_id": "door-b", "hours": 48},
                        headers=viewer).json()
    assert [d["device_id"] for d in only_b["devices"]] == ["door-b"]
    assert sum(only_b["devices"][0]["counts"]["granted"]) == 1
    assert client.get("/api/events/hourly", params={"hours": 0}, headers=viewer).status_code == 422
