"""``FramePipeline``: everything one frame goes through, in one place, owned by the processing thread.

detect, align and embed (``FacePipeline.analyze``; the face mesh it ran for alignment travels with each
face) -> tracker -> liveness (reusing that mesh: it runs once per face even with the challenge or planar
check on) -> track fusion (``device.decide.fusion``) -> gallery search -> decide (recognition, then the
``[access]`` policy). Decisions leave with their model and gallery versions set when they are made. The
agent (``device.agent.loop``) only feeds frames, swaps models on reload and acts on the decisions.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from core.types import Chip, Decision, Detection, Embedding, Frame, ImageArray, LivenessResult
from device.config import DeviceConfig
from device.decide import AccessPolicy, DecisionEngine, FaceObservation, Tracker
from device.decide.fusion import TrackFusion
from device.gallery import Gallery
from device.liveness.base import LivenessEngine
from models.face.mesh import MeshResult


class FaceLike(Protocol):
    """What the frame pipeline needs from one analysed face (``device.vision.pipeline.FaceResult``)."""

    @property
    def detection(self) -> Detection: ...
    @property
    def chip(self) -> Chip: ...
    @property
    def embedding(self) -> Embedding: ...
    @property
    def latencies_ms(self) -> dict[str, float]: ...
    @property
    def mesh(self) -> MeshResult | None: ...


class Analyzer(Protocol):
    """What the frame pipeline needs from the face pipeline (``device.vision.pipeline.FacePipeline``)."""

    @property
    def model_sha256(self) -> str: ...
    @property
    def model_version(self) -> str: ...
    def analyze(self, rgb: ImageArray) -> Sequence[FaceLike]: ...
    def close(self) -> None: ...


@dataclass(slots=True)
class Models:
    """The swappable pair: the pipeline and the gallery built for its embedder."""

    pipeline: Analyzer
    gallery: Gallery


LatencyObserver = Callable[[Mapping[str, float]], None]


@dataclass(frozen=True, slots=True)
class FaceDecision:
    """A decision made in a frame and the detection it was made for (for an opted-in snapshot)."""

    decision: Decision
    detection: Detection


@dataclass(frozen=True, slots=True)
class FaceView:
    """One face of a processed frame as a frame observer sees it (biometric: never log or send it)."""

    track_id: int
    detection: Detection
    chip: Chip
    liveness: LivenessResult


@dataclass(slots=True)
class FrameResult:
    """What one frame produced: how many faces, the per-face stage latencies, the decisions due, and each
    face's track, box, chip and liveness (for frame observers such as the kiosk screen)."""

    faces: int = 0
    latencies: list[dict[str, float]] = field(default_factory=list)
    decisions: list[FaceDecision] = field(default_factory=list)
    views: list[FaceView] = field(default_factory=list)


class FramePipeline:
    """Tracker, liveness, fusion, search and decision engine for a stream of frames; one thread only."""

    def __init__(self, config: DeviceConfig, liveness: LivenessEngine) -> None:
        self.liveness = liveness
        self.tracker = Tracker(config.decision.track_timeout_s)
        self.engine = DecisionEngine(config.decision, AccessPolicy(config.access),
                                     liveness_required=config.liveness.required)
        self.fusion = TrackFusion(config.decision.fuse_frames)

    def process(self, frame: Frame, models: Models) -> FrameResult:
        """Run one frame through every stage with ``models``; return its faces, latencies and decisions."""
        return self.decide(frame, models, self.analyze(frame, models))

    def analyze(self, frame: Frame, models: Models) -> Sequence[FaceLike]:
        """Detect, align (the face mesh kept with each face) and embed every face of the frame."""
        return models.pipeline.analyze(frame.rgb)

    def decide(self, frame: Frame, models: Models, faces: Sequence[FaceLike]) -> FrameResult:
        """Track, liveness, fusion, search and decide for the analysed faces of one frame."""
        self.expire(frame.timestamp)
        track_ids = self.tracker.assign([f.detection.box for f in faces], frame.timestamp)
        result = FrameResult(faces=len(faces))
        gallery_version = models.gallery.version if faces else ""
        for face, track_id in zip(faces, track_ids, strict=True):
            latencies = dict(face.latencies_ms)
            t0 = time.perf_counter()
            live = self.liveness.assess(frame.rgb, face.detection, track_id, frame.timestamp,
                                        mesh=face.mesh)
            t1 = time.perf_counter()
            vector = self.fusion.update(track_id, face.embedding.vector, face.chip.quality)
            match = models.gallery.search(vector)
            t2 = time.perf_counter()
            latencies["liveness"] = (t1 - t0) * 1000.0
            latencies["search"] = (t2 - t1) * 1000.0
            result.latencies.append(latencies)
            result.views.append(FaceView(track_id, face.detection, face.chip, live))
            obs = FaceObservation(track_id, match, live, frame.timestamp, frame.source_id, latencies)
            decision = self.engine.observe(obs, models.pipeline.model_version, gallery_version)
            if decision is not None:
                result.decisions.append(FaceDecision(decision, face.detection))
        return result

    def expire(self, now: float) -> None:
        """End the tracks not seen since the track timeout."""
        self.end_tracks(self.tracker.expire(now))

    def clear(self) -> None:
        """End every track (the camera dropped: whoever was there is gone)."""
        self.end_tracks(self.tracker.clear())

    def end_tracks(self, ended: list[int]) -> None:
        """Forget the decision, fusion and liveness state of ended tracks."""
        for track_id in ended:
            self.engine.end_track(track_id)
            self.fusion.end_track(track_id)
            self.liveness.end_track(track_id)
