"""Every door opening is an event: manual unlocks from MQTT, Home Assistant and the CLI go through the outbox
as ``manual_unlock`` with who asked, the correlation id and the seconds; stale, unstamped and retained
commands are refused with the reason; the server stores and shows the event.

A real agent (the project's built models, a replay camera without faces, a simulated relay), its real
MQTT side and a real broker; Home Assistant's command template is rendered with Jinja as HA renders it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from jinja2.sandbox import ImmutableSandboxedEnvironment

from core.protocol.schemas import CommandRequest, CommandResponse, EventConfirm, EventPayload, utcnow
from core.protocol.topics import Topics
from core.types import DecisionKind
from device.agent.loop import Agent
from device.agent.runner import build_agent
from device.config import DeviceConfig
from device.door import DoorState
from device.mqtt.homeassistant import LOCK_COMMAND_TEMPLATE, discovery_configs
from device.mqtt.service import DeviceMqtt, stale_reason
from facegate.cli import main
from server.api.deps import SESSION_COOKIE
from tests.agent_support import no_face_frames, wait_until, write_frames
from tests.conftest import Broker
from tests.mqtt_kit import Collector
from tests.server_support import PREFIX, SITE, connected_server, login

DEVICE = "door-manual"
TOPICS = Topics(PREFIX, SITE)


def door_config(tmp_path: Path, models: Path, broker: Broker, **mqtt: Any) -> DeviceConfig:
    """A connected door with the secure defaults (liveness required, calibrated tau)."""
    frames = write_frames(tmp_path / "frames", no_face_frames(2))
    return DeviceConfig.model_validate({
        "device": {"id": DEVICE, "site": SITE, "data_dir": str(tmp_path / "door")},
        "models": {"dir": str(models)},
        "camera": {"type": "replay", "path": str(frames), "fps": 5.0, "loop": True},
        "door": {"type": "simulated", "unlock_seconds": 5.0},
        "mqtt": {"enabled": True, "host": broker.host, "port": broker.port, "prefix": PREFIX,
                 "status_interval_s": 1, **mqtt},
        "bundle": {"enabled": False},
    })


@contextmanager
def connected_door(config: DeviceConfig) -> Iterator[tuple[Agent, DeviceMqtt]]:
    """The agent and its MQTT side wired as ``facegate device run`` wires them (without bundles)."""
    agent = build_agent(config)
    mqtt = DeviceMqtt(config, agent)
    agent.add_sink(mqtt.sink)
    online = Collector(config.mqtt.host, config.mqtt.port, [TOPICS.available(DEVICE)], client_id="online")
    mqtt.start()
    agent.start()
    try:
        # "online" goes out after the door's subscriptions on the same connection: commands reach it now
        assert online.wait(lambda ms: any(m.payload == b"online" for m in ms))
        yield agent, mqtt
    finally:
        online.close()
        agent.stop()
        mqtt.close()


def command(sender: Collector, payload: bytes) -> CommandResponse:
    """Publish an unlock command and return the device's answer to it (matched on its correlation id)."""
    topic = TOPICS.command_response(DEVICE, "unlock")
    wanted = CommandRequest.parse(payload).correlation_id
    assert wanted is not None
    sender.client.publish(TOPICS.command(DEVICE, "unlock"), payload, qos=1).wait_for_publish(5)

    def answers() -> list[CommandResponse]:
        parsed = [CommandResponse.parse(m.payload) for m in sender.on_topic(topic)]
        return [r for r in parsed if r.correlation_id == wanted]

    assert sender.wait(lambda _ms: bool(answers()))
    return answers()[-1]


def manual_events(collector: Collector) -> list[EventPayload]:
    """The manual_unlock events a subscriber received."""
    events = [EventPayload.parse(m.payload) for m in collector.on_topic(TOPICS.events(DEVICE))]
    return [e for e in events if e.decision is DecisionKind.MANUAL_UNLOCK]


def render_ha(template: str, value: str, now: Callable[[], dt.datetime]) -> str:
    """Render a command template as Home Assistant does: a sandboxed Jinja with ``now()`` and ``value``."""
    return ImmutableSandboxedEnvironment().from_string(template).render(value=value, now=now)


def test_manual_unlock_over_mqtt_is_an_event_that_a_subscriber_receives(
        tmp_path: Path, built_models: Path, mosquitto: Broker) -> None:
    config = door_config(tmp_path, built_models, mosquitto)
    subscriber = Collector(mosquitto.host, mosquitto.port, [TOPICS.events(DEVICE)], client_id="siem")
    sender = Collector(mosquitto.host, mosquitto.port, [f"{TOPICS.device(DEVICE)}/cmd/+/response"],
                       client_id="operator")
    try:
        with connected_door(config) as (agent, mqtt):
            request = CommandRequest(correlation_id="c-7781", seconds=3, requested_by="reception",
                                     ts=utcnow())
            reply = command(sender, request.to_bytes())
            assert reply.ok and reply.correlation_id == "c-7781" and reply.detail == "unlocked for 3.0 s"
            assert agent.door.state is DoorState.UNLOCKED
            assert subscriber.wait(lambda ms: len(ms) >= 1)
            (event,) = manual_events(subscriber)
            print("manual_unlock event as a subscriber receives it:",
                  subscriber.on_topic(TOPICS.events(DEVICE))[0].payload.decode())
            assert (event.requested_by, event.correlation_id, event.seconds) == ("reception", "c-7781", 3.0)
            assert event.device == DEVICE and event.person_id is None
            assert mqtt.outbox.depth == 1  # on disk in the outbox until the server's receipt covers it
            for receipt in EventConfirm.of(DEVICE, [event.seq]):  # what the audit subscriber sends
                sender.client.publish(TOPICS.events_confirm(DEVICE), receipt.to_bytes(), qos=1)
            assert wait_until(lambda: mqtt.outbox.depth == 0)
            assert agent.status().decisions == {"manual_unlock": 1}
    finally:
        subscriber.close()
        sender.close()


def test_manual_unlock_retained_stale_and_unstamped_commands_are_refused_with_the_reason(
        tmp_path: Path, built_models: Path, mosquitto: Broker) -> None:
    config = door_config(tmp_path, built_models, mosquitto, command_max_age_s=30.0)
    sender = Collector(mosquitto.host, mosquitto.port, [f"{TOPICS.device(DEVICE)}/cmd/+/response"],
                       client_id="operator")
    subscriber = Collector(mosquitto.host, mosquitto.port, [TOPICS.events(DEVICE)], client_id="siem")
    try:
        # A retained unlock, fresh when sent, left on the broker: the door meets it when it subscribes.
        retained = CommandRequest(correlation_id="r-1", ts=utcnow(), requested_by="someone")
        sender.client.publish(TOPICS.command(DEVICE, "unlock"), retained.to_bytes(), qos=1,
                              retain=True).wait_for_publish(5)
        topic = TOPICS.command_response(DEVICE, "unlock")
        with connected_door(config) as (agent, _):
            assert sender.wait(lambda ms: any(m.topic == topic for m in ms))
            reply = CommandResponse.parse(sender.on_topic(topic)[-1].payload)
            assert not reply.ok and reply.correlation_id == "r-1" and "retained" in reply.detail
            clear = sender.client.publish(TOPICS.command(DEVICE, "unlock"), b"", qos=1, retain=True)
            clear.wait_for_publish(5)

            reply = command(sender, CommandRequest(correlation_id="n-1", requested_by="x").to_bytes())
            assert not reply.ok and "no ts" in reply.detail
            old = utcnow() - dt.timedelta(seconds=120)
            reply = command(sender, CommandRequest(correlation_id="o-1", ts=old).to_bytes())
            assert not reply.ok and "120 s old" in reply.detail and "command_max_age_s" in reply.detail
            future = utcnow() + dt.timedelta(minutes=10)
            reply = command(sender, CommandRequest(correlation_id="f-1", ts=future).to_bytes())
            assert not reply.ok and "future" in reply.detail

            assert all(t.state is DoorState.LOCKED for t in agent.door.transitions)
            assert manual_events(subscriber) == [] and "manual_unlock" not in agent.status().decisions
    finally:
        sender.close()
        subscriber.close()


def test_manual_unlock_from_home_assistant_renders_a_fresh_stamped_command(
        tmp_path: Path, built_models: Path, mosquitto: Broker) -> None:
    config = door_config(tmp_path, built_models, mosquitto)
    lock = next(c for topic, c in discovery_configs(TOPICS, DEVICE, "0")
                if topic.startswith("homeassistant/lock"))
    assert lock["command_template"] == LOCK_COMMAND_TEMPLATE
    rendered = render_ha(lock["command_template"], lock["payload_unlock"],
                         lambda: dt.datetime.now().astimezone())
    request = CommandRequest.parse(rendered)
    assert request.action == "UNLOCK" and request.requested_by == "homeassistant" and request.ts is not None
    assert request.correlation_id is not None and stale_reason(request, False, 30.0) is None
    # a command HA queued while the door was away (rendered 5 minutes ago) is refused
    late = CommandRequest.parse(render_ha(lock["command_template"], "UNLOCK",
                                          lambda: dt.datetime.now().astimezone() - dt.timedelta(minutes=5)))
    assert "old" in (stale_reason(late, False, 30.0) or "")

    ha = Collector(mosquitto.host, mosquitto.port, [f"{TOPICS.device(DEVICE)}/cmd/+/response",
                                                    TOPICS.events(DEVICE)], client_id="homeassistant")
    try:
        with connected_door(config) as (agent, _):
            reply = command(ha, render_ha(LOCK_COMMAND_TEMPLATE, "UNLOCK",
                                          lambda: dt.datetime.now().astimezone()).encode())
            assert reply.ok and agent.door.state is DoorState.UNLOCKED
            assert ha.wait(lambda ms: len(manual_events(ha)) == 1)
            (event,) = manual_events(ha)
            assert event.requested_by == "homeassistant" and event.seconds == 5.0  # the door's default
            assert event.correlation_id is not None and event.correlation_id.startswith("ha-")
            later = dt.datetime.now().astimezone() + dt.timedelta(milliseconds=5)  # another correlation id
            lock_reply = command(ha, render_ha(LOCK_COMMAND_TEMPLATE, "LOCK", lambda: later).encode())
            assert not lock_reply.ok and "locks by itself" in lock_reply.detail
    finally:
        ha.close()


def test_manual_unlock_from_the_cli_is_stored_and_shown_by_the_server(
        tmp_path: Path, built_models: Path, mosquitto: Broker) -> None:
    config = door_config(tmp_path, built_models, mosquitto)
    config_file = tmp_path / "door.toml"
    config_file.write_text(
        f'[device]\nid = "{DEVICE}"\nsite = "{SITE}"\ndata_dir = "{tmp_path / "cli"}"\n'
        f'[mqtt]\nenabled = true\nhost = "{mosquitto.host}"\nport = {mosquitto.port}\nprefix = "{PREFIX}"\n',
        encoding="utf-8")
    with connected_server(tmp_path / "server", mosquitto.host, mosquitto.port) as server, \
            connected_door(config) as (agent, _):
        result = CliRunner().invoke(main, ["device", "unlock", "--config", str(config_file), "--seconds", "2",
                                           "--requested-by", "night-guard"])
        assert result.exit_code == 0, result.output
        reply = CommandResponse.parse(result.stdout.strip().splitlines()[-1])
        assert reply.ok and reply.correlation_id is not None and reply.correlation_id.startswith("cli-")
        assert agent.door.state is DoorState.UNLOCKED

        headers = login(server)

        def stored() -> list[dict[str, Any]]:
            body = server.get("/api/events", params={"kind": "manual_unlock"}, headers=headers).json()
            items: list[dict[str, Any]] = body["items"]
            return items

        assert wait_until(lambda: len(stored()) == 1)
        (row,) = stored()
        assert (row["device_id"], row["kind"], row["person_id"], row["score"]) == (
            DEVICE, "manual_unlock", None, None)
        assert row["detail"] == f"by night-guard for 2 s ({reply.correlation_id})"
        server.cookies.set(SESSION_COOKIE, headers["Authorization"].removeprefix("Bearer "))
        page = server.get("/events", params={"kind": "manual_unlock"})
        assert page.status_code == 200 and "manual_unlock" in page.text and "by night-guard" in page.text
        csv_text = server.get("/api/events.csv", headers=headers).text
        assert "manual_unlock" in csv_text and "by night-guard" in csv_text


@pytest.mark.parametrize(("kind", "detail"), [("manual_unlock", "by ops for 4 s"),
                                              ("door_fault", "relay stuck")])
def test_manual_unlock_and_door_fault_events_are_filterable_and_explained(kind: str, detail: str) -> None:
    from server.api.events import EVENT_KINDS, event_detail

    assert kind in EVENT_KINDS
    payload = {"decision": kind, "requested_by": "ops", "seconds": 4, "reason": "relay stuck"}
    assert event_detail(payload) == detail
