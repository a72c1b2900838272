"""Open-set decisions: tau and margin, k-of-n confirmation, unknown once per track, cooldown, spoof."""

from __future__ import annotations

from core.types import DecisionKind, LivenessCheck, LivenessResult, LivenessVerdict, Match
from device.config import DecisionConfig
from device.decide import DecisionEngine, FaceObservation, Tracker, iou

LIVE = LivenessResult(LivenessVerdict.LIVE, (LivenessCheck("passive", 0.9, LivenessVerdict.LIVE),))
SKIP = LivenessResult.skipped()
SPOOF = LivenessResult(LivenessVerdict.SPOOF, (LivenessCheck("passive", 0.1, LivenessVerdict.SPOOF),))
UNCERTAIN = LivenessResult(LivenessVerdict.UNCERTAIN)
# Synthetic scores around tau 0.6: the engine's rules, not the calibrated operating point, are under test.
CFG = DecisionConfig(tau=0.6, delta=0.05, confirm_k=2, confirm_n=3, cooldown_s=10.0, track_timeout_s=1.0,
                     acknowledge_low_tau=True)


def alice(score: float = 0.8, runner: float = 0.3) -> Match:
    return Match("alice", "Alice", score, runner)


def feed(engine: DecisionEngine, matches: list[Match], track: int = 1, t0: float = 0.0,
         liveness: LivenessResult = LIVE) -> list[DecisionKind]:
    """Feed one match per frame (0.1 s apart); return the kinds emitted."""
    kinds = []
    for i, m in enumerate(matches):
        d = engine.observe(FaceObservation(track, m, liveness, t0 + 0.1 * i, "cam",
                                           {"detect": 1.0, "embed": 2.0}), "m1", "g1")
        if d is not None:
            kinds.append(d.kind)
    return kinds


def test_k_of_n_confirms_before_granting_and_grants_once_per_track() -> None:
    engine = DecisionEngine(CFG)
    d1 = engine.observe(FaceObservation(1, alice(), LIVE, 0.0, "cam", {"detect": 3.0}), "m1", "g7")
    assert d1 is None  # 1 of 3 is not enough
    d2 = engine.observe(FaceObservation(1, alice(0.82, 0.35), LIVE, 0.1, "cam", {"detect": 3.0}), "m1", "g7")
    assert d2 is not None and d2.kind is DecisionKind.GRANTED
    assert (d2.person_id, d2.name, d2.model_version, d2.gallery_version) == ("alice", "Alice", "m1", "g7")
    assert abs(d2.score - 0.82) < 1e-9 and abs(d2.margin - 0.47) < 1e-9
    assert d2.liveness is LIVE and d2.latencies_ms["detect"] == 3.0 and "decide" in d2.latencies_ms
    assert feed(engine, [alice()] * 5, t0=0.2) == []


def test_one_accepted_frame_among_rejections_is_not_enough() -> None:
    engine = DecisionEngine(CFG)
    low = Match("alice", "Alice", 0.55, 0.1)
    assert feed(engine, [alice(), low, low, alice(), low]) == []


def test_margin_below_delta_is_not_accepted() -> None:
    engine = DecisionEngine(CFG)
    close_call = Match("alice", "Alice", 0.8, 0.77)  # above tau, but twin-like runner-up
    assert not engine.accepts(close_call)
    assert feed(engine, [close_call] * 6) == []


def test_below_tau_for_n_frames_is_unknown_once_per_track() -> None:
    engine = DecisionEngine(CFG)
    stranger = Match("bob", "Bob", 0.3, 0.2)
    assert feed(engine, [stranger] * 2) == []
    assert feed(engine, [stranger] * 8, t0=0.2) == [DecisionKind.UNKNOWN]
    d = engine.observe(FaceObservation(2, stranger, SKIP, 2.0), "", "")
    assert d is None  # a new track starts its own count
    assert feed(engine, [stranger] * 2, track=2, t0=2.1) == [DecisionKind.UNKNOWN]


def test_unknown_needs_consecutive_frames() -> None:
    engine = DecisionEngine(CFG)
    stranger = Match(None, None, 0.3, -1.0)
    ambiguous = Match("alice", "Alice", 0.7, 0.69)
    assert feed(engine, [stranger, stranger, ambiguous, stranger, stranger, ambiguous]) == []


def test_cooldown_makes_one_walk_through_one_event() -> None:
    engine = DecisionEngine(CFG)
    assert feed(engine, [alice()] * 3, track=1, t0=0.0) == [DecisionKind.GRANTED]
    engine.end_track(1)
    assert feed(engine, [alice()] * 3, track=2, t0=5.0) == []  # track broke, same person: suppressed
    assert feed(engine, [alice()] * 3, track=3, t0=11.0) == [DecisionKind.GRANTED]


def test_spoof_is_reported_once_and_never_grants() -> None:
    engine = DecisionEngine(CFG)
    kinds = feed(engine, [alice()] * 2, liveness=SPOOF)
    assert kinds == [DecisionKind.SPOOF]
    assert feed(engine, [alice()] * 4, t0=0.2) == []  # the track is tainted even if later frames pass
    d = engine.observe(FaceObservation(9, alice(), SPOOF, 3.0), "", "")
    assert d is not None and d.kind is DecisionKind.SPOOF and d.person_id == "alice"


def test_liveness_required_skipped_check_never_votes_to_grant() -> None:
    engine = DecisionEngine(CFG)  # liveness required: the default
    assert feed(engine, [alice()] * 6, liveness=SKIP) == []
    assert feed(engine, [alice()] * 2, t0=1.0, liveness=LIVE) == [DecisionKind.GRANTED]
    stranger = Match("bob", "Bob", 0.3, 0.2)
    assert feed(engine, [stranger] * 3, track=2, liveness=SKIP) == [DecisionKind.UNKNOWN]  # never opens


def test_liveness_required_false_lets_skipped_frames_vote() -> None:
    engine = DecisionEngine(CFG, liveness_required=False)  # [liveness] required = false: "liveness off"
    assert feed(engine, [alice()] * 2, liveness=SKIP) == [DecisionKind.GRANTED]


def test_uncertain_liveness_abstains_from_the_vote() -> None:
    engine = DecisionEngine(CFG)
    assert feed(engine, [alice()] * 4, liveness=UNCERTAIN) == []
    assert feed(engine, [alice()] * 2, t0=1.0, liveness=LIVE) == [DecisionKind.GRANTED]


def test_tracker_associates_by_iou_and_expires() -> None:
    tracker = Tracker(timeout_s=1.0)
    a, b = (0.0, 0.0, 100.0, 100.0), (300.0, 0.0, 400.0, 100.0)
    ids = tracker.assign([a, b], 0.0)
    assert ids[0] != ids[1]
    moved = (10.0, 5.0, 110.0, 105.0)
    assert iou(a, moved) > 0.3
    assert tracker.assign([b, moved], 0.1) == [ids[1], ids[0]]
    assert tracker.expire(0.9) == []
    assert tracker.assign([moved], 1.0) == [ids[0]]
    assert tracker.expire(1.5) == [ids[1]]
    far = (600.0, 600.0, 700.0, 700.0)
    new = tracker.assign([far], 1.6)
    assert new[0] not in ids
    assert sorted(tracker.clear()) == sorted([ids[0], new[0]])
