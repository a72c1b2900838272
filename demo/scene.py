"""Scenes in front of the door: frames played through its replay camera, events heard over MQTT, verdicts.

The door's camera is the ``replay`` source of its config (``[camera] path`` is a folder with a blank
doorway, ``loop = true``), fed scene by scene: each queued scene's PNG files are the camera's next pass,
read once at the configured frame rate, and with nothing queued it loops over the blank doorway. The
director knows a scene is over when the camera has read its last frame, enough blank frames have
followed to end every face track, every frame has been processed and the subscriber has received as
many events as the agent decided.
"""

from __future__ import annotations

import itertools
import logging
import math
import queue
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.mqtt.client import Message, MqttClient
from core.protocol.schemas import EventPayload, PayloadError
from core.protocol.topics import Topics
from core.types import DecisionKind, ImageArray
from demo.stack import DemoError, wait_until
from device.agent.loop import Agent
from device.camera import ReplaySource
from device.config import ReplayCameraConfig
from device.door.base import DoorState
from server.enrollment.service import encode_chip

logger = logging.getLogger(__name__)

BLANK_SIDE_PX = 320
# Each photo is shown for this many frames, as a camera sees a person for a moment (>= confirm_n).
REPEAT = 3
# A scene's waits fail only when the camera, the door or the subscriber made no progress for this long.
SCENE_STALL_S = 120.0


class SceneCamera(ReplaySource):
    """The replay camera, fed scene by scene: a queued scene is the next pass, else the blank doorway."""

    def __init__(self, config: ReplayCameraConfig) -> None:
        super().__init__(config.path, config.fps, loop=True, source_id=f"replay:{config.path.name}")
        self._scenes: queue.Queue[tuple[list[Path], threading.Event]] = queue.Queue()
        self._playing: threading.Event | None = None

    def play(self, files: list[Path]) -> threading.Event:
        """Queue a scene (image files in play order); the event is set once the camera has read them all."""
        done = threading.Event()
        self._scenes.put((files, done))
        return done

    def _list(self) -> list[Path]:
        """What the next pass reads (ReplaySource calls this when a pass ends)."""
        if self._playing is not None:
            self._playing.set()
            self._playing = None
        try:
            files, self._playing = self._scenes.get_nowait()
        except queue.Empty:
            return super()._list()
        return files


class Stage:
    """The frames on disk: a blank doorway for the camera's folder, one folder per scene."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blank = root / "doorway"
        self._scenes = itertools.count(1)
        self._write(self.blank / "blank.png", np.full((BLANK_SIDE_PX, BLANK_SIDE_PX, 3), 96, np.uint8))

    @staticmethod
    def _write(path: Path, rgb: ImageArray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_chip(rgb))  # lossless PNG: the door sees the exact pixels

    def scene(self, frames: list[ImageArray]) -> list[Path]:
        """Write a scene's frames; return the files in play order."""
        folder = self.root / f"scene-{next(self._scenes):02d}"
        paths = [folder / f"{i:04d}.png" for i in range(len(frames))]
        for path, rgb in zip(paths, frames, strict=True):
            self._write(path, rgb)
        return paths

    @staticmethod
    def remove(paths: list[Path]) -> None:
        """Delete a played scene."""
        for folder in {p.parent for p in paths}:
            shutil.rmtree(folder, ignore_errors=True)


@dataclass(frozen=True, slots=True)
class Heard:
    """An event as the subscriber received it."""

    event: EventPayload
    received: float  # time.time()


class EventLog:
    """Subscribes to every door's events and keeps them in arrival order, each ``event_id`` once (a door
    may send an event again: QoS 1, or no receipt yet); ``on_event`` prints each one."""

    def __init__(self, client: MqttClient, topics: Topics, on_event: Callable[[EventPayload], None]) -> None:
        self.client = client
        self.topics = topics
        self.on_event = on_event
        self._heard: list[Heard] = []
        self._ids: set[uuid.UUID] = set()
        self.duplicates = 0
        self._lock = threading.Lock()
        self._unsubscribe: Callable[[], None] | None = None

    def start(self) -> EventLog:
        """Subscribe to the events topic filter."""
        self._unsubscribe = self.client.subscribe(self.topics.all_events, self._on_message)
        return self

    def _on_message(self, message: Message) -> None:
        try:
            event = EventPayload.parse(message.payload)
        except PayloadError as exc:
            logger.warning("ignoring a malformed event on %s: %s", message.topic, exc)
            return
        with self._lock:
            if event.event_id in self._ids:
                self.duplicates += 1
                return
            self._ids.add(event.event_id)
            self._heard.append(Heard(event, time.time()))
        self.on_event(event)

    @property
    def count(self) -> int:
        """Distinct events received so far."""
        with self._lock:
            return len(self._heard)

    def since(self, index: int) -> list[Heard]:
        """Events received after the first ``index``."""
        with self._lock:
            return self._heard[index:]

    def close(self) -> None:
        """Unsubscribe (idempotent)."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None


@dataclass(slots=True)
class Step:
    """One scripted scene and its verdict."""

    name: str
    shown: str
    expected: DecisionKind
    expected_person_id: str | None = None
    forbidden: frozenset[DecisionKind] = frozenset()
    label: str = ""  # how to show the observed decision (e.g. "unknown (deleted)")
    heard: list[Heard] = field(default_factory=list)
    door_opened: bool = False
    note: str = ""
    error: str = ""

    @property
    def first(self) -> EventPayload | None:
        """The scene's first event."""
        return self.heard[0].event if self.heard else None

    @property
    def observed(self) -> str:
        """The first event's decision, or 'none'."""
        first = self.first
        if first is None:
            return "none" if not self.error else "error"
        return f"{first.decision.value} ({self.label})" if self.label else first.decision.value

    @property
    def passed(self) -> bool:
        """Expected first decision (and person), no forbidden one, and the door did what it should."""
        first = self.first
        if self.error or first is None or first.decision is not self.expected:
            return False
        if self.expected_person_id is not None and first.person_id != self.expected_person_id:
            return False
        if any(h.event.decision in self.forbidden for h in self.heard):
            return False
        return self.door_opened == (self.expected is DecisionKind.GRANTED)


class Director:
    """Plays scenes through the door's camera and collects what the subscriber hears."""

    def __init__(self, agent: Agent, camera: SceneCamera, stage: Stage, events: EventLog, fps: float,
                 track_timeout_s: float) -> None:
        self.agent = agent
        self.camera = camera
        self.stage = stage
        self.events = events
        # Blank frames that end every face track: the track timeout at the replay rate, plus two.
        self.gap_frames = math.ceil(track_timeout_s * fps) + 2

    def _frames(self) -> int:
        return self.camera.frames

    def _decisions(self) -> int:
        return sum(self.agent.status().decisions.values())

    def _drained(self) -> bool:
        status = self.agent.status()
        return status.frames_processed + status.queue_drops >= status.frames_captured

    def play(self, step: Step, photos: list[ImageArray]) -> Step:
        """Show each photo for REPEAT frames, wait for the doorway to be empty again, judge the step."""
        paths = self.stage.scene([rgb for rgb in photos for _ in range(REPEAT)])
        heard_before, decided_before = self.events.count, self._decisions()
        started = time.monotonic()
        try:
            done = self.camera.play(paths)
            wait_until(done.is_set, f"the camera to show the '{step.name}' scene", SCENE_STALL_S,
                       self._frames)
            ended = self.camera.frames + self.gap_frames
            wait_until(lambda: self.camera.frames >= ended, "the face tracks to end", SCENE_STALL_S,
                       self._frames)
            wait_until(self._drained, "the door to process every frame", SCENE_STALL_S,
                       lambda: self.agent.status().frames_processed)
            decided = self._decisions() - decided_before
            wait_until(lambda: self.events.count >= heard_before + decided,
                       f"{decided} event(s) to arrive over MQTT", SCENE_STALL_S, lambda: self.events.count)
        except DemoError as exc:
            step.error = str(exc)
        finally:
            self.stage.remove(paths)
        step.heard = self.events.since(heard_before)
        step.door_opened = any(t.state is DoorState.UNLOCKED and t.monotonic >= started
                               for t in self.agent.door.transitions)
        return step
