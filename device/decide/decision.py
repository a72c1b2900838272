"""Open-set access decisions over face tracks.

Per frame and face: the gallery's best identity is *accepted* when ``score >= tau`` and
``score - runner_up >= delta``. Over a track:

- ``granted`` once ``confirm_k`` of the last ``confirm_n`` votes name the same person, at most once
  per track, and at most once per person per ``cooldown_s`` (one walk-through, one event);
- ``denied`` instead of ``granted`` when the access policy (:mod:`device.decide.access`: blocked
  persons, the weekly schedule) refuses the recognised person; it names the person, carries the
  reason, leaves the door locked and obeys the same once-per-track and per-person cooldown (kept per
  person *and* kind, so a person denied at 06:59 is still granted at 07:00 when the schedule opens);
- ``unknown`` once a face stays below ``tau`` for ``confirm_n`` consecutive frames, once per track;
- ``spoof`` as soon as liveness says so, once per track; a spoofed track can never be granted.

Frames whose liveness is ``uncertain`` (a challenge still running) abstain from the vote. While liveness
is required (the default), only a ``live`` verdict votes: a ``skipped`` check abstains too, so a door
whose checks did not run never grants. Only a door configured with ``[liveness] required = false`` lets
skipped frames vote.
Ambiguous faces (above tau but within delta of the runner-up) produce no event: the door stays locked.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from core.types import Decision, DecisionKind, LivenessResult, LivenessVerdict, Match
from device.config import DecisionConfig
from device.decide.access import AccessPolicy

logger = logging.getLogger(__name__)

# Kinds that name the person: the vote recognised them, the policy then granted or denied entry.
RECOGNISED = frozenset({DecisionKind.GRANTED, DecisionKind.DENIED})


@dataclass(frozen=True, slots=True)
class FaceObservation:
    """What the loop knows about one face in one frame."""

    track_id: int
    match: Match
    liveness: LivenessResult
    timestamp: float
    source_id: str = ""
    latencies_ms: dict[str, float] = field(default_factory=dict)


@dataclass(slots=True)
class _TrackState:
    votes: deque[str | None]
    below: int = 0
    recognised: bool = False  # granted or denied: the track is decided
    unknown_sent: bool = False
    spoofed: bool = False


class DecisionEngine:
    """Turns per-frame observations into at most one event per track and kind."""

    def __init__(self, config: DecisionConfig, access: AccessPolicy | None = None, *,
                 liveness_required: bool = True) -> None:
        self.config = config
        self.access = access
        self.liveness_required = liveness_required
        self._tracks: dict[int, _TrackState] = {}
        self._last_event: dict[tuple[str, DecisionKind], float] = {}  # (person, granted|denied) -> time

    def accepts(self, match: Match) -> bool:
        """The open-set rule: a known identity above tau with enough margin over the runner-up."""
        return (match.person_id is not None and match.score >= self.config.tau
                and match.margin >= self.config.delta)

    def _state(self, track_id: int) -> _TrackState:
        state = self._tracks.get(track_id)
        if state is None:
            state = _TrackState(votes=deque(maxlen=self.config.confirm_n))
            self._tracks[track_id] = state
        return state

    def observe(self, obs: FaceObservation, model_version: str = "",
                gallery_version: str = "") -> Decision | None:
        """Feed one face observation; return a decision when one is due, else None."""
        started = time.perf_counter()
        state = self._state(obs.track_id)
        match, cfg = obs.match, self.config
        accepted = self.accepts(match)
        kind: DecisionKind | None = None
        reason = ""

        if obs.liveness.verdict is LivenessVerdict.SPOOF:
            if not state.spoofed:
                kind = DecisionKind.SPOOF
            state.spoofed = True
        else:
            state.below = state.below + 1 if match.score < cfg.tau else 0
            if self._votes(obs.liveness.verdict):
                state.votes.append(match.person_id if accepted else None)
            kind, reason = self._vote(state, obs)

        if kind is None:
            return None
        latencies = dict(obs.latencies_ms)
        latencies["decide"] = (time.perf_counter() - started) * 1000.0
        named = kind in RECOGNISED or (kind is DecisionKind.SPOOF and accepted)
        decision = Decision(
            kind=kind,
            person_id=match.person_id if named else None,
            name=match.name if named else None,
            score=match.score,
            margin=match.margin,
            liveness=obs.liveness,
            latencies_ms=latencies,
            model_version=model_version,
            gallery_version=gallery_version,
            timestamp=time.time(),  # wall clock for events; obs.timestamp is monotonic
            source_id=obs.source_id,
            reason=reason,
        )
        logger.info("decision %s track=%d person=%s score=%.3f margin=%.3f%s", kind.value, obs.track_id,
                    decision.person_id, match.score, match.margin, f" reason={reason}" if reason else "")
        return decision

    def _votes(self, verdict: LivenessVerdict) -> bool:
        """Whether a frame with this liveness verdict takes part in the vote."""
        if verdict is LivenessVerdict.LIVE:
            return True
        return verdict is LivenessVerdict.SKIPPED and not self.liveness_required

    def _vote(self, state: _TrackState, obs: FaceObservation) -> tuple[DecisionKind | None, str]:
        """The track's decision now due, if any, and the reason of a denial."""
        cfg = self.config
        if state.spoofed or state.recognised:
            return None, ""
        person = obs.match.person_id
        if person is not None and state.votes.count(person) >= cfg.confirm_k \
                and Counter(v for v in state.votes if v is not None).most_common(1)[0][0] == person:
            state.recognised = True
            refusal = self.access.check(person) if self.access is not None else None
            kind = DecisionKind.GRANTED if refusal is None else DecisionKind.DENIED
            last = self._last_event.get((person, kind))
            if last is not None and obs.timestamp - last < cfg.cooldown_s:
                logger.debug("%s for %s suppressed by cooldown", kind.value, person)
                return None, ""
            self._last_event[(person, kind)] = obs.timestamp
            return kind, "" if refusal is None else refusal.value
        if state.below >= cfg.confirm_n and not state.unknown_sent:
            state.unknown_sent = True
            return DecisionKind.UNKNOWN, ""
        return None, ""

    def end_track(self, track_id: int) -> None:
        """Forget an ended track."""
        self._tracks.pop(track_id, None)

    def reset(self) -> None:
        """Forget every track (cooldowns are kept: they are per person, not per track)."""
        self._tracks.clear()
