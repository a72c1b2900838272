"""Deleting a person: chips and embeddings purged at once, a signed gallery removal published over real
mosquitto, pending until every known door acks it, then "deleted; confirmed by devices ..." audited."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from core.protocol.schemas import GalleryDelta, canonical_json
from device.bundles.signing import load_public_key, verify
from server.app import create_app
from server.db.models import AuditEntry, Chip, Device, Person, Template, new_id
from server.enrollment.templates import new_template
from tests.conftest import Broker
from tests.server_support import (
    SimDevice,
    connected_server,
    delta_ack,
    delta_opener,
    login,
    make_config,
    state_of,
    wait_until,
)


class Door(SimDevice):
    """A simulated door that receives the retained gallery delta and (optionally) acks it."""

    def __init__(self, broker: Broker, device_id: str, auto_ack: bool,
                 opener: Callable[[GalleryDelta], GalleryDelta] | None = None) -> None:
        super().__init__(broker.host, broker.port, device_id)
        self.auto_ack = auto_ack
        self.opener = opener  # opens sealed deltas (tests look at their content)
        self.deltas: list[GalleryDelta] = []  # opened (content readable)
        self.signed: list[GalleryDelta] = []  # as received (signed, sealed)
        self._got = threading.Condition()
        self.client.on_message = self._on_delta
        self.client.subscribe(self.topics.gallery_delta, qos=1)

    def _on_delta(self, _client: Any, _userdata: Any, msg: paho.MQTTMessage) -> None:
        if msg.topic != self.topics.gallery_delta:
            return
        signed = GalleryDelta.parse(bytes(msg.payload))
        delta = self.opener(signed) if self.opener is not None else signed
        with self._got:
            self.signed.append(signed)
            self.deltas.append(delta)
            self._got.notify_all()
        if self.auto_ack:
            self.client.publish(self.topics.bundle_ack(self.device_id),
                                delta_ack(self.device_id, delta.seq).to_bytes(), qos=1, retain=True)

    def latest_removing(self, person_id: str) -> GalleryDelta:
        """Wait for a delta that removes ``person_id``."""
        wait_until(lambda: any(person_id in d.remove for d in self.deltas), f"a delta removing {person_id}")
        return next(d for d in reversed(self.deltas) if person_id in d.remove)


@pytest.fixture()
def client(tmp_path: Path, mosquitto: Broker, db_url: str) -> Iterator[TestClient]:
    with connected_server(tmp_path, mosquitto.host, mosquitto.port, db_url) as test_client:
        yield test_client


def _person_with_template(client: TestClient, name: str) -> str:
    """A person with one encrypted chip and one template, as enrollment stores them."""
    headers = login(client)
    created = client.post("/api/persons", json={"name": name, "consent": True}, headers=headers)
    person_id: str = created.json()["id"]
    state = state_of(client)
    chip_id = new_id()
    with state.db.transaction() as session:
        session.add(Chip(id=chip_id, person_id=person_id, key_id=state.cipher.key_id.hex(), width=2, height=2,
                         ciphertext=state.cipher.encrypt(b"chip-png-bytes", chip_id)))
        vector = np.ones(128, np.float32) / np.sqrt(128)
        session.add(new_template(state.cipher, person_id=person_id, chip_id=chip_id, model_sha256="a" * 64,
                                 vector=vector))
    return person_id


def _devices_known(client: TestClient, ids: set[str]) -> bool:
    with state_of(client).db.session() as session:
        return set(session.scalars(select(Device.device_id))) >= ids


def test_deletion_is_pending_until_every_device_acks(client: TestClient, mosquitto: Broker) -> None:
    doors = [Door(mosquitto, "door-a", auto_ack=False, opener=delta_opener(client)),
             Door(mosquitto, "door-b", auto_ack=False, opener=delta_opener(client))]
    try:
        for door in doors:
            door.online()
            door.flush()
        wait_until(lambda: _devices_known(client, {"door-a", "door-b"}), "both doors registered")
        person_id = _person_with_template(client, "Grace")
        headers = login(client)

        response = client.delete(f"/api/persons/{person_id}?wait_s=0", headers=headers)
        assert response.status_code == 202
        deletion = response.json()
        assert deletion["status"] == "pending" and deletion["delta_sequence"] >= 1
        assert [(d["device_id"], d["state"]) for d in deletion["devices"]] == [("door-a", "pending"),
                                                                              ("door-b", "pending")]
        with state_of(client).db.session() as session:  # purged here at once
            assert session.get(Person, person_id) is None
            assert session.scalar(select(func.count()).select_from(Chip)) == 0
            assert session.scalar(select(func.count()).select_from(Template)) == 0
        assert client.get(f"/api/persons/{person_id}", headers=headers).status_code == 404

        # The removal each door receives is signed with the server key (over its sealed form) and, opened,
        # names the person.
        delta = doors[0].latest_removing(person_id)
        signed = next(d for d in doors[0].signed if d.seq == delta.seq)
        assert signed.sealed is not None and person_id not in signed.to_bytes().decode()
        public = state_of(client).config.signing_key_path.with_name("bundle.key.pub").read_text().strip()
        verify(load_public_key(public), signed.signature, canonical_json(signed.signed_part()), "delta")

        doors[0].ack(delta_ack("door-a", delta.seq))
        doors[0].flush()

        def state_of_door(device: str) -> str:
            body = client.get(f"/api/deletions/{deletion['id']}", headers=headers).json()
            return str(next(d["state"] for d in body["devices"] if d["device_id"] == device))

        wait_until(lambda: state_of_door("door-a") == "confirmed", "door-a's confirmation")
        assert client.get(f"/api/deletions/{deletion['id']}", headers=headers).json()["status"] == "pending"
        assert [d["id"] for d in client.get("/api/deletions?pending=true", headers=headers).json()] == \
            [deletion["id"]]

        doors[1].ack(delta_ack("door-b", delta.seq, state="removals_only"))
        doors[1].flush()
        wait_until(lambda: client.get(f"/api/deletions/{deletion['id']}", headers=headers).json()["status"]
                   == "confirmed", "the confirmed deletion")
    finally:
        for door in doors:
            door.close()
    with state_of(client).db.session() as session:
        details = session.scalars(select(AuditEntry.detail).where(AuditEntry.person_id == person_id)
                                  .order_by(AuditEntry.id)).all()
    assert details[-1] == "deleted; confirmed by devices door-a, door-b"
    assert any("requested" in d and "1 template(s)" in d for d in details)


def test_delete_waits_for_acks_and_answers_confirmed(client: TestClient, mosquitto: Broker) -> None:
    door = Door(mosquitto, "door-c", auto_ack=True, opener=delta_opener(client))
    try:
        door.online()
        door.flush()
        wait_until(lambda: _devices_known(client, {"door-c"}), "door-c registered")
        person_id = _person_with_template(client, "Alan")
        response = client.delete(f"/api/persons/{person_id}?wait_s=30", headers=login(client))
    finally:
        door.close()
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "confirmed"
    assert body["devices"][0]["device_id"] == "door-c" and body["devices"][0]["state"] == "confirmed"


def test_an_ack_for_an_older_delta_does_not_confirm(client: TestClient, mosquitto: Broker) -> None:
    door = Door(mosquitto, "door-d", auto_ack=False, opener=delta_opener(client))
    try:
        door.online()
        door.flush()
        wait_until(lambda: _devices_known(client, {"door-d"}), "door-d registered")
        headers = login(client)
        first = _person_with_template(client, "First")
        client.delete(f"/api/persons/{first}?wait_s=0", headers=headers)
        old_seq = door.latest_removing(first).seq
        second = _person_with_template(client, "Second")
        deletion = client.delete(f"/api/persons/{second}?wait_s=0", headers=headers).json()
        door.ack(delta_ack("door-d", old_seq))
        door.flush()
        wait_until(lambda: client.get("/api/deletions?pending=false", headers=headers).json() != [],
                   "the first deletion's confirmation")
        again = client.get(f"/api/deletions/{deletion['id']}", headers=headers).json()
        assert again["status"] == "pending"
        rejected = door.latest_removing(second)
        door.ack(delta_ack("door-d", rejected.seq, state="rejected"))
        door.flush()
        door.ack(delta_ack("door-d", rejected.seq))
        door.flush()
        wait_until(lambda: client.get(f"/api/deletions/{deletion['id']}", headers=headers).json()["status"]
                   == "confirmed", "confirmation after the retry")
    finally:
        door.close()


def test_without_devices_a_deletion_is_confirmed_at_once(tmp_path: Path, db_url: str) -> None:
    with TestClient(create_app(make_config(tmp_path, db_url), start_mqtt=False)) as offline:
        headers = login(offline)
        created = offline.post("/api/persons", json={"name": "Solo", "consent": True}, headers=headers)
        person_id = created.json()["id"]
        body = offline.delete(f"/api/persons/{person_id}", headers=headers).json()
        assert body["status"] == "confirmed" and body["devices"] == []
        assert offline.delete(f"/api/persons/{person_id}", headers=headers).status_code == 404
