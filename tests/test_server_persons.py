"""Persons through the API on both engines (``db_url``): create, search, page, update, conflicts on the
unique external id (the failed transaction is rolled back and the next request works), aware UTC times,
the audit trail, and the admin's persons page."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from server.app import create_app
from server.db.models import AuditEntry, Person
from tests.server_support import ADMIN_PASSWORD, login, make_config, state_of

NAMES = ("Grace Hopper", "Ada Lovelace", "Alan Turing", "Barbara Liskov")


@pytest.fixture()
def client(tmp_path: Path, db_url: str) -> Iterator[TestClient]:
    config = make_config(tmp_path, db_url, rate_limit={"per_minute": 6000, "burst": 1000})
    with TestClient(create_app(config, start_mqtt=False)) as test_client:
        yield test_client


def _utc(text: str) -> dt.datetime:
    value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    assert value.utcoffset() == dt.timedelta(0), text
    return value


def test_persons_create_search_page_and_update(client: TestClient) -> None:
    headers = login(client)
    before = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5)
    ids = {}
    for i, name in enumerate(NAMES):
        response = client.post("/api/persons", headers=headers,
                               json={"name": name, "external_id": f"EMP-{i}", "consent": i != 3})
        assert response.status_code == 201, response.text
        body = response.json()
        ids[name] = body["id"]
        assert _utc(body["created_at"]) >= before and body["templates"] == 0
        assert (body["consent_at"] is None) == (i == 3)
    listed = client.get("/api/persons", headers=headers, params={"limit": 2}).json()
    assert listed["total"] == 4 and [p["name"] for p in listed["items"]] == ["Ada Lovelace", "Alan Turing"]
    second = client.get("/api/persons", headers=headers, params={"limit": 2, "offset": 2}).json()
    assert [p["name"] for p in second["items"]] == ["Barbara Liskov", "Grace Hopper"]
    found = client.get("/api/persons", headers=headers, params={"q": "LOVE"}).json()
    assert [p["id"] for p in found["items"]] == [ids["Ada Lovelace"]]
    by_external = client.get("/api/persons", headers=headers, params={"q": "emp-2"}).json()
    assert [p["name"] for p in by_external["items"]] == ["Alan Turing"]
    for wildcard in ("%", "_", "EMP_", "\\"):  # a search is a literal substring, never a LIKE pattern
        none = client.get("/api/persons", headers=headers, params={"q": wildcard}).json()
        assert none["total"] == 0, wildcard

    barbara = ids["Barbara Liskov"]
    updated = client.patch(f"/api/persons/{barbara}", headers=headers,
                           json={"consent": True, "name": "B. Liskov"})
    assert updated.status_code == 200 and updated.json()["name"] == "B. Liskov"
    assert _utc(updated.json()["consent_at"]) >= before
    assert client.get(f"/api/persons/{'0' * 32}", headers=headers).status_code == 404
    with state_of(client).db.session() as session:
        actions = session.scalars(select(AuditEntry.action).where(AuditEntry.person_id == barbara)).all()
        assert sorted(actions) == ["person_created", "person_updated"]
        row = session.get(Person, barbara)
        assert row is not None and row.updated_at.tzinfo is not None and row.updated_at >= row.created_at


def test_persons_external_id_conflicts_are_409_and_change_nothing(client: TestClient) -> None:
    headers = login(client)
    first = client.post("/api/persons", headers=headers, json={"name": "Ada", "external_id": "E-1",
                                                               "consent": True}).json()
    other = client.post("/api/persons", headers=headers, json={"name": "Alan", "external_id": "E-2",
                                                               "consent": True}).json()
    duplicate = client.post("/api/persons", headers=headers, json={"name": "Eve", "external_id": "E-1",
                                                                   "consent": True})
    assert duplicate.status_code == 409 and "E-1" in duplicate.json()["detail"]
    clash = client.patch(f"/api/persons/{other['id']}", headers=headers, json={"external_id": "E-1"})
    assert clash.status_code == 409
    # The failed transactions were rolled back: the same session pool serves the next requests.
    assert client.get(f"/api/persons/{other['id']}", headers=headers).json()["external_id"] == "E-2"
    listed = client.get("/api/persons", headers=headers).json()
    assert sorted(p["name"] for p in listed["items"]) == ["Ada", "Alan"]
    assert client.patch(f"/api/persons/{first['id']}", headers=headers,
                        json={"external_id": "E-3"}).status_code == 200
    assert client.post("/api/persons", headers=headers, json={"name": "Eve", "external_id": "E-1",
                                                              "consent": True}).status_code == 201
    with state_of(client).db.session() as session:
        created = session.scalars(select(AuditEntry).where(AuditEntry.action == "person_created")).all()
        assert sorted(e.subject or "" for e in created) == ["Ada", "Alan", "Eve"]


def test_persons_page_searches_for_the_admin(client: TestClient) -> None:
    headers = login(client)
    for name in ("Ada Lovelace", "Alan Turing"):
        client.post("/api/persons", headers=headers, json={"name": name, "consent": True})
    response = client.post("/login", data={"username": "admin", "password": ADMIN_PASSWORD},
                           follow_redirects=False)
    assert response.status_code == 303
    page = client.get("/persons", params={"q": "lovel"})
    assert page.status_code == 200
    assert "Ada Lovelace" in page.text and "Alan Turing" not in page.text
