"""Two server replicas behind one broker and one database, as ``[mqtt] share_group`` runs them.

Ingest reaches them through an MQTT v5 shared subscription (each message goes to one replica), so the
same door's messages are stored by both, concurrently and in any order. What must hold:

- every event is stored exactly once by ``event_id`` (also an event sent twice, whose copies land on
  different replicas), both replicas take part, and a replica that stops and comes back loses nothing;
- a deletion whose doors' acks land on different replicas is confirmed, once;
- a door's bundle acks stored out of order never move its rollout state backwards;
- a login on one replica is valid on the other, and a logout on one is seen by the other (the web and
  API sessions live in the database).

Shared subscriptions need mosquitto (the embedded amqtt broker has none): these tests skip without it
and never use the ``mosquitto`` fixture, whose fallback is amqtt.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from core.protocol.schemas import BundleAck
from server.api.deps import SESSION_COOKIE
from server.app import create_app
from server.broker import LocalBroker, mosquitto_binary
from server.bundles.signing import generate_key
from server.db.models import AuditEntry, BundleAckRow, Device, EventRow
from server.state import AppState
from tests.mqtt_kit import CONNECT_S
from tests.server_support import (
    ADMIN_PASSWORD,
    SimDevice,
    event_payload,
    login,
    make_config,
    state_of,
    wait_until,
)
from tests.test_server_deletion import Door, _person_with_template

pytestmark = pytest.mark.skipif(
    mosquitto_binary() is None,
    reason="replicas need MQTT v5 shared subscriptions, which the embedded amqtt broker lacks: "
           "apt install mosquitto; put /usr/sbin on PATH")

GROUP = "ingest"
DOORS = tuple(f"door-{i}" for i in range(6))
EVENTS_PER_DOOR = 40  # per phase; every 4th is sent twice
SENT_TWICE_EVERY = 4


@pytest.fixture()
def broker(tmp_path: Path) -> Iterator[LocalBroker]:
    with LocalBroker(data_dir=tmp_path / "broker", prefer="mosquitto") as running:
        yield running


@contextlib.contextmanager
def replica(tmp_path: Path, broker: LocalBroker, db_url: str, name: str) -> Iterator[TestClient]:
    """A running replica (the app with its MQTT side connected)."""
    config = make_config(tmp_path, db_url, mqtt={"enabled": True, "host": broker.host, "port": broker.port,
                                                 "client_id": f"server-{name}", "share_group": GROUP})
    if not config.signing_key_path.is_file():
        generate_key(config.signing_key_path)  # one key in the shared data_dir
    with TestClient(create_app(config)) as client:
        state = state_of(client)
        assert state.source is not None and state.source.wait_connected(CONNECT_S)
        yield client


@pytest.fixture()
def pair(tmp_path: Path, broker: LocalBroker, db_url: str) -> Iterator[tuple[TestClient, TestClient]]:
    with replica(tmp_path, broker, db_url, "a") as a, replica(tmp_path, broker, db_url, "b") as b:
        yield a, b


def _events(state: AppState) -> tuple[int, int]:
    """(rows, distinct event ids) in the shared database."""
    with state.db.session() as session:
        rows = session.scalar(select(func.count()).select_from(EventRow)) or 0
        distinct = session.scalar(select(func.count(func.distinct(EventRow.event_id)))) or 0
    return int(rows), int(distinct)


def _send(doors: list[SimDevice], start: int) -> tuple[int, int]:
    """EVENTS_PER_DOOR events per door, every SENT_TWICE_EVERY-th twice; return (distinct, publishes)."""
    distinct = publishes = 0
    for seq in range(start, start + EVENTS_PER_DOOR):
        for door in doors:
            payload = event_payload(door.device_id, seq=seq)
            for _ in range(2 if seq % SENT_TWICE_EVERY == 0 else 1):
                door.event(payload)
                publishes += 1
            distinct += 1
    for door in doors:
        door.flush()
    return distinct, publishes


def test_replicas_split_the_ingest_and_store_every_event_once(tmp_path: Path, broker: LocalBroker,
                                                              db_url: str) -> None:
    doors = [SimDevice(broker.host, broker.port, d) for d in DOORS]
    try:
        with replica(tmp_path, broker, db_url, "a") as a:
            with replica(tmp_path, broker, db_url, "b") as b:
                sa, sb = state_of(a), state_of(b)
                audit_a, audit_b = sa.audit, sb.audit
                assert audit_a is not None and audit_b is not None
                distinct, publishes = _send(doors, 1)
                wait_until(lambda: _events(sa) == (distinct, distinct), "every event stored",
                           progress=lambda: _events(sa)[0])
                wait_until(lambda: audit_a.stats.received + audit_b.stats.received >= publishes,
                           "both replicas' writers done")
                inserted = (audit_a.stats.inserted, audit_b.stats.inserted)
                assert min(inserted) > 0, f"one replica stored nothing: {inserted}"  # both take part
                assert sum(inserted) == distinct  # RETURNING: no event counted by both
                assert audit_a.stats.duplicates + audit_b.stats.duplicates == publishes - distinct
            # b stopped: a keeps storing (what the broker had already queued for b's session waits for b).
            more, _ = _send(doors, 1 + EVENTS_PER_DOOR)
            wait_until(lambda: _events(sa)[1] > distinct, "a storing while b is away")
            with replica(tmp_path, broker, db_url, "b") as b:  # b back: its queued share is stored
                wait_until(lambda: _events(sa) == (distinct + more, distinct + more),
                           "every event stored once after b came back", progress=lambda: _events(sa)[0])
            with sa.db.session() as session:
                seqs = {(r.device_id, int(r.payload["seq"])) for r in session.scalars(select(EventRow))}
            assert seqs == {(d, s) for d in DOORS for s in range(1, 1 + 2 * EVENTS_PER_DOOR)}
    finally:
        for door in doors:
            door.close()


def test_a_deletion_acked_through_both_replicas_is_confirmed_once(
        pair: tuple[TestClient, TestClient], broker: LocalBroker) -> None:
    a, b = pair
    doors = [Door(broker, d, auto_ack=True) for d in DOORS]
    try:
        for door in doors:
            door.online()
            door.flush()

        def known() -> bool:
            with state_of(a).db.session() as session:
                return set(session.scalars(select(Device.device_id))) >= set(DOORS)

        wait_until(known, "every door registered")
        persons = [_person_with_template(a, f"Person {i}") for i in range(3)]
        headers = login(a)
        requests = [a.delete(f"/api/persons/{p}?wait_s=0", headers=headers).json()["id"] for p in persons]
        other = login(b)  # b answers for the requests a made: the state is in the database

        def confirmed() -> bool:
            return all(b.get(f"/api/deletions/{r}", headers=other).json()["status"] == "confirmed"
                       for r in requests)

        wait_until(confirmed, "every deletion confirmed")
        with state_of(a).db.session() as session:
            for person in persons:
                done = session.scalars(select(AuditEntry.detail).where(
                    AuditEntry.person_id == person, AuditEntry.action == "deleted")).all()
                assert done == [f"deleted; confirmed by devices {', '.join(DOORS)}"]
            received = [s.audit.stats.received for s in (state_of(a), state_of(b)) if s.audit is not None]
        assert len(received) == 2 and min(received) > 0, received  # acks really went through both
    finally:
        for door in doors:
            door.close()


def test_bundle_acks_stored_out_of_order_never_step_back(pair: tuple[TestClient, TestClient],
                                                          broker: LocalBroker) -> None:
    a, _b = pair
    doors = [SimDevice(broker.host, broker.port, d) for d in DOORS]
    t0 = dt.datetime.now(dt.UTC)
    steps = [("downloading", 10.0, None), ("downloading", 60.0, None), ("verifying", 100.0, None),
             ("installed", 100.0, 7)]
    try:
        for round_ in range(3):  # the same progression, re-sent: each copy may land on either replica
            for door in doors:
                for i, (state, percent, running) in enumerate(steps):
                    door.ack(BundleAck(device=door.device_id, sequence=7, state=state, percent=percent,
                                       running_sequence=running,
                                       ts=t0 + dt.timedelta(milliseconds=10 * i + round_)))
            for door in doors:
                door.flush()

        def settled() -> bool:
            with state_of(a).db.session() as session:
                rows = session.scalars(select(BundleAckRow).where(BundleAckRow.sequence == 7)).all()
                return len(rows) == len(DOORS) and all(r.state == "installed" for r in rows)

        wait_until(settled, "every door's ack at its latest state")
        with state_of(a).db.session() as session:
            serving = dict(session.execute(select(Device.device_id, Device.bundle_sequence)).tuples().all())
        assert serving == dict.fromkeys(DOORS, 7)
    finally:
        for door in doors:
            door.close()


def test_a_session_from_one_replica_serves_the_other(pair: tuple[TestClient, TestClient]) -> None:
    a, b = pair
    headers = login(a)
    assert b.get("/api/persons", headers=headers).status_code == 200  # a's API token on b
    page = a.post("/login", data={"username": "admin", "password": ADMIN_PASSWORD}, follow_redirects=False)
    assert page.status_code == 303, page.text
    cookie = page.cookies[SESSION_COOKIE]
    b.cookies.set(SESSION_COOKIE, cookie)
    persons = b.get("/persons", follow_redirects=False)
    assert persons.status_code == 200 and "login" not in persons.headers.get("location", "")  # on b
    assert a.post("/api/auth/logout", headers=headers).status_code == 204
    assert b.get("/api/persons", headers=headers).status_code == 401  # the logout on a holds on b
