"""Authorisation above recognition: the [access] config, the policy (windows, overnight, time zones,
exemptions, block list) with an injected clock, and the engine's ``denied`` decisions."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from core.protocol.schemas import EventPayload, decision_to_event
from core.types import Decision, DecisionKind, LivenessCheck, LivenessResult, LivenessVerdict, Match
from device.config import AccessConfig, DecisionConfig, DeviceConfig, load_device_config
from device.decide import AccessPolicy, DecisionEngine, DenyReason, FaceObservation
from facegate.configio import ConfigError

REPO = Path(__file__).resolve().parents[1]
UTC = ZoneInfo("UTC")
BERLIN = ZoneInfo("Europe/Berlin")
OFFICE = {"days": ["mon", "tue", "wed", "thu", "fri"], "start": "07:00", "end": "19:00"}
FRIDAY_NIGHT = {"days": ["fri"], "start": "22:00", "end": "06:00", "overnight": True}
LIVE = LivenessResult(LivenessVerdict.LIVE, (LivenessCheck("passive", 0.9, LivenessVerdict.LIVE),))
CFG = DecisionConfig(tau=0.6, delta=0.05, confirm_k=2, confirm_n=3, cooldown_s=10.0, track_timeout_s=1.0,
                     acknowledge_low_tau=True)  # synthetic scores: the policy is under test, not tau


def at(year: int, month: int, day: int, hour: int, minute: int = 0, second: int = 0,
       zone: ZoneInfo = UTC) -> float:
    """Epoch seconds of a wall-clock time in ``zone``."""
    return datetime(year, month, day, hour, minute, second, tzinfo=zone).timestamp()


def policy(clock_value: float = 0.0, **access: Any) -> AccessPolicy:
    """A policy from a dict through the real pydantic model, with a fixed clock."""
    return AccessPolicy(AccessConfig.model_validate(access), clock=lambda: clock_value)


# 2026-03-02 is a Monday, 2026-03-06 a Friday, 2026-03-07 a Saturday, 2026-03-08 a Sunday.
MON, FRI, SAT, SUN = (2026, 3, 2), (2026, 3, 6), (2026, 3, 7), (2026, 3, 8)


def test_calendar_assumption() -> None:
    assert [datetime(*d).strftime("%a") for d in (MON, FRI, SAT, SUN)] == ["Mon", "Fri", "Sat", "Sun"]


@pytest.mark.parametrize(("day", "hour", "minute", "second", "allowed"), [
    (MON, 7, 0, 0, True),       # start is inclusive
    (MON, 18, 59, 59, True),
    (MON, 19, 0, 0, False),     # end is exclusive
    (MON, 6, 59, 59, False),
    (FRI, 12, 0, 0, True),
    (SAT, 12, 0, 0, False),     # not a listed day
])
def test_day_window(day: tuple[int, int, int], hour: int, minute: int, second: int, allowed: bool) -> None:
    p = policy(timezone="UTC", schedule=[OFFICE])
    now = at(*day, hour, minute, second)
    assert p.in_schedule(now) is allowed
    assert p.check("alice", now) is (None if allowed else DenyReason.OUTSIDE_SCHEDULE)


@pytest.mark.parametrize(("day", "hour", "minute", "allowed"), [
    (FRI, 22, 0, True),         # the evening part, on the listed day
    (FRI, 23, 59, True),
    (SAT, 0, 0, True),          # past midnight: the morning part, after the listed day
    (SAT, 5, 59, True),
    (SAT, 6, 0, False),         # ends at 06:00 on the next day
    (FRI, 21, 59, False),
    (FRI, 3, 0, False),         # Friday morning belongs to Thursday night, which is not listed
    (SAT, 23, 0, False),        # Saturday evening is not listed
])
def test_overnight_window(day: tuple[int, int, int], hour: int, minute: int, allowed: bool) -> None:
    p = policy(timezone="UTC", schedule=[FRIDAY_NIGHT])
    assert p.in_schedule(at(*day, hour, minute)) is allowed


def test_overnight_window_wraps_the_week() -> None:
    sunday_night = {"days": ["sun"], "start": "20:00", "end": "04:00", "overnight": True}
    p = policy(timezone="UTC", schedule=[sunday_night])
    assert p.in_schedule(at(*SUN, 21))
    assert p.in_schedule(at(2026, 3, 9, 3, 30))  # Monday morning, after Sunday night
    assert not p.in_schedule(at(2026, 3, 9, 21))
    assert not p.in_schedule(at(*SAT, 21))


def test_several_windows_any_one_allows() -> None:
    saturday = {"days": ["sat"], "start": "09:00", "end": "12:00"}
    p = policy(timezone="UTC", schedule=[OFFICE, FRIDAY_NIGHT, saturday])
    assert p.in_schedule(at(*SAT, 2)) and p.in_schedule(at(*SAT, 10)) and not p.in_schedule(at(*SAT, 13))


def test_empty_schedule_always_allows_and_restricts_nobody() -> None:
    p = policy()
    assert not p.restricts
    assert all(p.check("anyone", at(*SUN, h)) is None for h in range(24))


def test_always_allowed_is_exempt_from_the_schedule_but_others_are_not() -> None:
    p = policy(timezone="UTC", schedule=[OFFICE], always_allowed=["guard"])
    night = at(*SAT, 3)
    assert p.check("guard", night) is None
    assert p.check("alice", night) is DenyReason.OUTSIDE_SCHEDULE


def test_blocked_is_refused_inside_the_window_and_without_a_schedule() -> None:
    inside = at(*MON, 10)
    assert policy(timezone="UTC", schedule=[OFFICE], blocked=["mallory"]).check("mallory", inside) \
        is DenyReason.BLOCKED
    p = policy(blocked=["mallory"])
    assert p.restricts
    assert p.check("mallory", inside) is DenyReason.BLOCKED and p.check("alice", inside) is None


def test_timezone_decides_which_wall_clock_the_window_means() -> None:
    window = [{"start": "09:00", "end": "17:00"}]  # every day
    summer = at(2026, 7, 6, 7, 30)  # 07:30 UTC = 09:30 CEST
    assert policy(timezone="Europe/Berlin", schedule=window).in_schedule(summer)
    assert not policy(timezone="UTC", schedule=window).in_schedule(summer)
    # Winter: Berlin is UTC+1, so 07:30 UTC is 08:30 there (DST handled by zoneinfo).
    berlin = policy(timezone="Europe/Berlin", schedule=window)
    assert not berlin.in_schedule(at(2026, 1, 5, 7, 30)) and berlin.in_schedule(at(2026, 1, 5, 8, 30))
    assert berlin.local_time(summer).hour == 9


@pytest.fixture()
def tokyo_local() -> Iterator[None]:
    """Make the system local zone Asia/Tokyo for one test (the default when no timezone is set)."""
    old = os.environ.get("TZ")
    os.environ["TZ"] = "Asia/Tokyo"
    time.tzset()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = old
        time.tzset()


def test_default_timezone_is_the_system_local_zone(tokyo_local: None) -> None:
    p = policy(schedule=[{"start": "09:00", "end": "17:00"}])
    now = at(*MON, 1)  # 01:00 UTC = 10:00 in Tokyo
    assert p.local_time(now).hour == 10
    assert p.in_schedule(now)
    assert not p.in_schedule(at(*MON, 10))  # 19:00 in Tokyo


def test_the_injected_clock_is_used_when_no_time_is_given() -> None:
    assert policy(at(*MON, 10), timezone="UTC", schedule=[OFFICE]).check("alice") is None
    sunday = policy(at(*SUN, 10), timezone="UTC", schedule=[OFFICE])
    assert sunday.check("alice") is DenyReason.OUTSIDE_SCHEDULE


# ----------------------------------------------------------------------------- config validation


def _errors(tmp_path: Path, toml: str) -> list[str]:
    path = tmp_path / "device.toml"
    path.write_text(toml, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_device_config(path, environ={})
    return info.value.errors


@pytest.mark.parametrize(("toml", "field", "words"), [
    ('[[access.schedule]]\nstart = "19:00"\nend = "07:00"\n', "access.schedule.0", "overnight = true"),
    ('[[access.schedule]]\nstart = "09:00"\nend = "09:00"\n', "access.schedule.0", "before end"),
    ('[[access.schedule]]\nstart = "06:00"\nend = "22:00"\novernight = true\n', "access.schedule.0",
     "end before its start"),
    ('[[access.schedule]]\ndays = ["mon", "funday"]\nstart = "07:00"\nend = "19:00"\n',
     "access.schedule.0.days.1", "'mon'"),
    ('[[access.schedule]]\nstart = "7am"\nend = "19:00"\n', "access.schedule.0.start", "HH:MM"),
    ('[[access.schedule]]\nstart = "07:00"\nend = "25:00"\n', "access.schedule.0.end", "HH:MM"),
    ('[[access.schedule]]\nstart = "24:00"\nend = "24:00"\n', "access.schedule.0", "24:00"),
    ('[[access.schedule]]\nstart = "07:00"\n', "access.schedule.0.end", "required"),
    ('[[access.schedule]]\ndays = []\nstart = "07:00"\nend = "19:00"\n', "access.schedule.0.days",
     "at least"),
    ('[[access.schedule]]\nstart = "07:00"\nend = "19:00"\nevery = "day"\n', "access.schedule.0.every",
     "Extra"),
    ('[access]\ntimezone = "Mars/Olympus_Mons"\n', "access.timezone", "IANA"),
    ('[access]\nalways_allowed = ["bob"]\nblocked = ["bob"]\n', "access", "bob"),
    ('[access]\nblocked = [""]\n', "access.blocked.0", "at least 1"),
])
def test_bad_access_config_names_the_field(tmp_path: Path, toml: str, field: str, words: str) -> None:
    errors = _errors(tmp_path, toml)
    assert any(e.startswith(f"{field}: ") and words in e for e in errors), errors


def test_access_config_accepts_toml_times_mixed_case_days_and_end_of_day(tmp_path: Path) -> None:
    path = tmp_path / "device.toml"
    path.write_text('[access]\ntimezone = "Europe/Berlin"\n[[access.schedule]]\ndays = ["Mon", "SAT"]\n'
                    "start = 07:30:00\nend = \"24:00\"\n", encoding="utf-8")
    access = load_device_config(path, environ={}).access
    window = access.schedule[0]
    assert window.days == ("mon", "sat") and window.start == "07:30" and window.end_minute == 24 * 60
    assert DeviceConfig().access == AccessConfig()  # default: nobody restricted


def test_example_access_block_validates_when_uncommented(tmp_path: Path) -> None:
    text = (REPO / "deploy" / "device.example.toml").read_text(encoding="utf-8")
    block = text[text.index("[access]"):]
    uncommented = "\n".join(re.sub(r"^# ", "", line) for line in block.splitlines())
    path = tmp_path / "access.toml"
    path.write_text(uncommented, encoding="utf-8")
    access = load_device_config(path, environ={}).access
    assert len(access.schedule) == 2 and access.schedule[1].overnight and access.blocked
    p = AccessPolicy(access)
    assert p.check("security-1", at(*SUN, 3, zone=BERLIN)) is None
    assert p.check("someone", at(*SAT, 3, zone=BERLIN)) is None  # Friday night window
    assert p.check("someone", at(*SUN, 3, zone=BERLIN)) is DenyReason.OUTSIDE_SCHEDULE
    assert p.check("badge-suspended-42", at(*MON, 10, zone=BERLIN)) is DenyReason.BLOCKED


# ----------------------------------------------------------------------------- the engine


class Clock:
    """A settable wall clock for the policy."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def feed(engine: DecisionEngine, person: str, track: int, t0: float, frames: int = 3) -> list[Decision]:
    """Show ``person`` (well above tau) on ``track`` for ``frames`` frames 0.1 s apart."""
    out = []
    for i in range(frames):
        obs = FaceObservation(track, Match(person, person.title(), 0.8, 0.3), LIVE,
                              t0 + 0.1 * i, "cam", {"detect": 1.0})
        decision = engine.observe(obs, "m1", "g1")
        if decision is not None:
            out.append(decision)
    return out


def engine_with(clock: Clock, **access: Any) -> DecisionEngine:
    return DecisionEngine(CFG, AccessPolicy(AccessConfig.model_validate(access), clock=clock))


def test_outside_the_schedule_is_denied_naming_the_person_with_the_reason() -> None:
    engine = engine_with(Clock(at(*SUN, 10)), timezone="UTC", schedule=[OFFICE])
    (decision,) = feed(engine, "alice", track=1, t0=0.0, frames=6)  # once per track
    assert decision.kind is DecisionKind.DENIED
    assert (decision.person_id, decision.name, decision.reason) == ("alice", "Alice", "outside_schedule")
    event = decision_to_event(decision, "door-1")
    assert (event.decision, event.person_id, event.reason, event.snapshot) == (
        DecisionKind.DENIED, "alice", "outside_schedule", False)
    wire = json.loads(event.to_bytes())
    assert wire["reason"] == "outside_schedule" and wire["person_id"] == "alice"
    assert EventPayload.parse(event.to_bytes()) == event


def test_granted_events_keep_their_old_wire_form() -> None:
    engine = engine_with(Clock(at(*MON, 10)), timezone="UTC", schedule=[OFFICE])
    (decision,) = feed(engine, "alice", track=1, t0=0.0)
    assert decision.kind is DecisionKind.GRANTED and decision.reason == ""
    wire = json.loads(decision_to_event(decision, "door-1").to_bytes())
    assert "reason" not in wire  # optional field, left out when unset: schema_version stays 1
    assert EventPayload.parse(json.dumps(wire)).reason is None


def test_blocked_person_is_denied_inside_the_window() -> None:
    engine = engine_with(Clock(at(*MON, 10)), timezone="UTC", schedule=[OFFICE], blocked=["mallory"])
    assert [(d.kind, d.person_id, d.reason) for d in feed(engine, "mallory", 1, 0.0)] == [
        (DecisionKind.DENIED, "mallory", "blocked")]
    assert [d.kind for d in feed(engine, "alice", 2, 0.0)] == [DecisionKind.GRANTED]


def test_denied_obeys_the_cooldown_but_does_not_hold_back_a_grant_when_the_window_opens() -> None:
    clock = Clock(at(*MON, 6, 59, 50))
    engine = engine_with(clock, timezone="UTC", schedule=[OFFICE])
    assert [d.kind for d in feed(engine, "alice", 1, t0=0.0)] == [DecisionKind.DENIED]
    engine.end_track(1)
    assert feed(engine, "alice", 2, t0=3.0) == []  # same walk-through, new track: still one event
    clock.now = at(*MON, 7, 0, 5)
    assert [d.kind for d in feed(engine, "alice", 3, t0=5.0)] == [DecisionKind.GRANTED]
    assert feed(engine, "alice", 4, t0=6.0) == []  # and the grant has its own cooldown
    clock.now = at(*SUN, 10)
    assert [d.kind for d in feed(engine, "alice", 5, t0=20.0)] == [DecisionKind.DENIED]  # cooldown over


def test_no_policy_behaves_as_before() -> None:
    engine = DecisionEngine(CFG)
    assert [d.kind for d in feed(engine, "alice", 1, 0.0)] == [DecisionKind.GRANTED]
