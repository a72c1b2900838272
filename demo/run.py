"""The demo's script: models, broker, server, cast, door, enrollment over HTTP, bundle, then the scenes.

Every piece is the project's own: :func:`models.convert.builder.build_all`,
:class:`server.broker.LocalBroker`,
``create_app`` served by uvicorn, the HTTP API, the gallery export, bundle builder, signer and publisher,
and a door wired as ``facegate device run`` wires it, watching a replay camera.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from core.mqtt.client import ClientSettings, MqttClient
from core.protocol.topics import Topics
from core.types import DecisionKind
from demo.cast import (
    Cast,
    CastError,
    Judge,
    celeba_candidates,
    choose,
    enrollee,
    nuaa_subject,
    packaged_candidates,
    shared_dir,
)
from demo.kiosk import KioskWatcher
from demo.report import Summary, event_line
from demo.scene import Director, EventLog, SceneCamera, Stage, Step
from demo.stack import (
    HTTP_POLL_S,
    START_STALL_S,
    Api,
    DemoError,
    DoorRunner,
    ServerRunner,
    ship_bundle,
    wait_until,
)
from device.config import DeviceConfig, LivenessConfig, ReplayCameraConfig
from device.decide.operating_point import operating_point
from device.liveness.base import LIVENESS_OFF
from device.liveness.fusion import build_liveness
from device.vision.pipeline import FacePipeline
from models.runtime.assets import default_models_dir
from models.runtime.manifest import load_manifest
from server.broker import LocalBroker, free_port
from server.bundles.signing import generate_key, public_key_b64
from server.config import ServerConfig
from server.crypto import generate_key_text

logger = logging.getLogger(__name__)

NAMES = ("Ada", "Ben", "Cleo")
# The calibrated open-set operating point for a gallery of this size (`facegate eval calibrate --open-set`).
TAU = operating_point(len(NAMES)).tau
DELTA = operating_point(len(NAMES)).delta
FPS = 10.0
TRACK_TIMEOUT_S = 1.0
UNLOCK_S = 2.0
PREFIX, SITE, DEVICE_ID = "facegate", "demo", "door-demo"
ADMIN = "admin"
# How long DELETE waits for the door's acknowledgement before answering 'pending' (then the demo polls).
DELETE_WAIT_S = 60.0
# A pending deletion fails the scene only when the door's delta state did not move for this long.
DELETE_STALL_S = 120.0
CAMERA_WAIT_S = 15.0  # how long a real camera may take to deliver its first frame


@dataclass(frozen=True, slots=True)
class Options:
    """What the command line asked for."""

    work: Path
    password: str
    camera: str | None = None
    screenshots: Path = Path("artifacts/screenshots/demo")


@contextlib.contextmanager
def phase(console: Console, text: str) -> Iterator[list[str]]:
    """A spinner while a stage runs, then a tick with its duration and whatever detail it appended."""
    detail: list[str] = []
    started = time.monotonic()
    with console.status(f"{text} ..."):
        yield detail
    extra = f": {'; '.join(detail)}" if detail else ""
    console.print(f"[green]✓[/] {text}{extra} [dim]({time.monotonic() - started:.1f} s)[/]")


def passive_available(models_dir: Path) -> bool:
    """Whether the models folder has the MiniFASNet files passive liveness needs."""
    manifest = load_manifest(models_dir)
    return all(manifest.has(name) for name in LivenessConfig().passive.models)


def door_liveness(passive: bool) -> dict[str, Any]:
    """The demo door's ``[liveness]``: passive MiniFASNet, or explicitly none (printed as "liveness off").

    The challenge stays off: the replay camera shows still photos, which cannot blink or turn.
    """
    if passive:
        return {"passive": {"enabled": True}, "challenge": {"mode": "never"}}
    return {"required": False, "passive": {"enabled": False}, "challenge": {"mode": "never"}}


def spoof_unavailable(models_dir: Path) -> str | None:
    """Why the printed-photo scene cannot run here, or None when it can."""
    labels = shared_dir() / "data" / "liveness-nuaa" / "labels.csv"
    if not labels.is_file():
        return f"no printed-photo data ({labels} is absent)"
    if not passive_available(models_dir):
        return ("the models were built without MiniFASNet (passive liveness): "
                f"{shared_dir() / 'models' / 'minifasnet'} is absent")
    return None


def server_config(opts: Options, broker: LocalBroker, models_dir: Path) -> ServerConfig:
    """SQLite, keys and bundles in the work folder; the audit subscriber on the demo broker."""
    return ServerConfig.model_validate({
        "data_dir": str(opts.work / "server"),
        "http": {"host": "127.0.0.1", "port": free_port()},
        "mqtt": {"host": broker.host, "port": broker.port, "prefix": PREFIX, "site": SITE,
                 "client_id": "facegate-demo-server"},
        "auth": {"bootstrap_admin": ADMIN, "bootstrap_password": opts.password},
        # A throw-away chip key in the config (as the env would pass it): no key file to back up.
        "crypto": {"chip_key": generate_key_text(), "create_key_file": False},
        "models": {"dir": str(models_dir)},
        "recognition": {"tau": TAU},
    })


def device_config(opts: Options, broker: LocalBroker, models_dir: Path, public_key: str,
                  passive: bool, doorway: Path) -> DeviceConfig:
    """The door: replay camera on the blank doorway (or a real camera), simulated relay, MQTT, bundles."""
    camera: dict[str, Any] = ({"type": "opencv", "source": opts.camera} if opts.camera is not None else
                              {"type": "replay", "path": str(doorway), "fps": FPS, "loop": True})
    return DeviceConfig.model_validate({
        "device": {"id": DEVICE_ID, "site": SITE, "data_dir": str(opts.work / "device")},
        "camera": camera,
        "door": {"type": "simulated", "unlock_seconds": UNLOCK_S},
        "models": {"dir": str(models_dir)},
        "decision": {"tau": TAU, "delta": DELTA, "confirm_k": 2, "confirm_n": 3, "cooldown_s": 600.0,
                     "track_timeout_s": TRACK_TIMEOUT_S},
        "liveness": door_liveness(passive),
        "mqtt": {"enabled": True, "host": broker.host, "port": broker.port, "prefix": PREFIX,
                 "homeassistant": False, "status_interval_s": 5.0},
        "bundle": {"public_key": public_key},
        "loop": {"queue_size": 64},
        "kiosk": {"enabled": True, "port": free_port()},  # the door screen, on loopback
    })


def pick_cast(config: ServerConfig, models_dir: Path, with_attack: bool, passive: bool) -> Cast:
    """Choose enrollees, door frames, a stranger and printed photos with the door's own pipeline (and, with
    ``passive``, its passive liveness: door frames are frames it calls live)."""
    shared = shared_dir()
    liveness = (build_liveness(LivenessConfig.model_validate(door_liveness(True)), models_dir)
                if passive else None)
    try:
        with FacePipeline.from_models_dir(models_dir, config.detector) as pipeline:
            judge = Judge(pipeline, config.quality, liveness, TAU, DELTA)
            fixed, attack = [], None
            if with_attack:
                subject, attack = nuaa_subject(judge, shared / "data" / "liveness-nuaa")
                fixed = [subject]
            celeba = shared / "data" / "celeba-faces"
            if (celeba / "identities.csv").is_file():
                source, notes = f"CelebA faces from {celeba}", []
                main, other, stranger = choose(judge, celeba_candidates(judge, celeba), fixed)
            else:
                source = f"faces packaged with scikit-image and matplotlib ({celeba} is absent)"
                notes = [
                    "the enrolled person (scikit-image's astronaut photo) has one photo only, so the door "
                    "sees shifted, zoomed and re-lit copies of the enrolment photo, not other photos of her",
                    "the stranger is a 25x25 grey LFW face from scikit-image, upscaled 8x: it is detected "
                    "and embedded, but too blurry to stand for a real person's photo",
                ]
                main, other, stranger = choose(judge, packaged_candidates(judge), fixed)
    finally:
        closer = getattr(liveness, "close", None)
        if callable(closer):
            closer()
    others = [enrollee(other, NAMES[1]), *(enrollee(c, NAMES[2]) for c in fixed)]
    return Cast(source, notes, enrollee(main, NAMES[0]), others, enrollee(stranger, "stranger"), attack,
                NAMES[2] if fixed else "")


class Demo:
    """Runs the whole system once; ``close()`` stops everything in reverse order."""

    def __init__(self, console: Console, opts: Options, summary: Summary) -> None:
        self.console = console
        self.opts = opts
        self.summary = summary
        self.stack = ExitStack()
        self.server: ServerRunner | None = None
        self.api: Api | None = None
        self.door: DoorRunner | None = None
        self.stage = Stage(opts.work / "frames")
        self.camera: SceneCamera | None = None
        self.watcher: KioskWatcher | None = None

    def watch_end(self) -> None:
        """Stop looking at the door screen; its states and screenshots go into the summary."""
        if self.watcher is not None:
            self.summary.kiosk = self.watcher.close().as_dict()
            self.watcher = None

    def close(self) -> None:
        """Stop the door, the server and the broker (idempotent)."""
        if self.door is not None:
            s = self.door.agent.status()
            logger.info("door counters: %d frames captured, %d processed, %d bad, %d dropped, decisions %s",
                        s.frames_captured, s.frames_processed, s.bad_frames, s.queue_drops, s.decisions)
        self.stack.close()

    def start(self) -> tuple[Cast, dict[str, str], EventLog]:
        """Everything up to a door running the server's signed bundle; return cast, person ids, events."""
        console, opts = self.console, self.opts
        models_dir = default_models_dir()
        shared_models = shared_dir() / "models" / "minifasnet"
        console.print(f"[bold]models[/] in {models_dir} (built on first use; later runs reuse them)")
        from models.convert.builder import build_all

        build_all(models_dir, minifasnet_dir=shared_models if shared_models.is_dir() else None)
        no_spoof = spoof_unavailable(models_dir)
        if no_spoof is not None and opts.camera is None:
            self.summary.skipped.append(("printed photo", no_spoof))
        with phase(console, "broker") as detail:
            broker = self.stack.enter_context(LocalBroker(data_dir=opts.work / "broker"))
            self.summary.broker = broker.kind
            detail.append(f"{broker.kind} on {broker.host}:{broker.port}")
        config = server_config(opts, broker, models_dir)
        key = generate_key(config.signing_key_path)
        with phase(console, "server") as detail:
            self.server = ServerRunner(config).start()
            self.stack.callback(self.server.close)
            detail.append(f"{self.server.url}, SQLite in {config.data_dir}, audit subscriber connected")
        passive = passive_available(models_dir)
        with phase(console, "choosing faces") as detail:
            try:
                cast = pick_cast(config, models_dir, with_attack=no_spoof is None, passive=passive)
                self.summary.liveness = ("passive (MiniFASNet)" if passive
                                         else f"{LIVENESS_OFF} (no MiniFASNet files)")
            except CastError as exc:
                if not passive or no_spoof is None:
                    raise
                # Photos that passive liveness calls spoof cannot play a live stranger: run without, say so.
                cast = pick_cast(config, models_dir, with_attack=False, passive=False)
                passive = False
                self.summary.liveness = (f"{LIVENESS_OFF} (passive liveness does not call enough of these "
                                         f"photos live to cast the scenes: {exc})")
            self.summary.image_set, self.summary.notes = cast.source, cast.notes
            detail.append(cast.source)
        console.print(f"  {cast.describe()}")
        for note in cast.notes:
            console.print(f"  [yellow]note[/] {note}")
        client = MqttClient(ClientSettings(broker.host, broker.port, "facegate-demo")).start()
        self.stack.callback(client.close)
        topics = Topics(PREFIX, SITE)
        events = EventLog(client, topics, lambda e: console.print(event_line(e))).start()
        self.stack.callback(events.close)
        if not client.wait_connected(START_STALL_S):
            raise DemoError("the demo's MQTT subscriber could not connect")
        with phase(console, "door") as detail:
            door_config = device_config(opts, broker, models_dir, public_key_b64(key), passive,
                                        self.stage.blank)
            if isinstance(door_config.camera, ReplayCameraConfig):
                self.camera = SceneCamera(door_config.camera)
            self.door = DoorRunner(door_config, source=self.camera).start()
            self.stack.callback(self.door.close)
            if self.door.kiosk is not None:  # a headless Chromium looks at the door screen throughout
                self.watcher = KioskWatcher(self.door.kiosk.url, opts.screenshots).start()
                self.stack.callback(self.watch_end)
            detail.append(f"{DEVICE_ID} on a {'real' if opts.camera is not None else 'replay'} camera, "
                          f"liveness: {escape(self.summary.liveness)}, no bundle yet")
        ids: dict[str, str] = {}
        with phase(console, "enrolling over HTTP") as detail:
            self.api = Api(self.server.url, ADMIN, opts.password)
            self.stack.callback(self.api.close)
            for person in [cast.main, *cast.others]:
                body = self.api.enroll(person.name, person.photos)
                ids[person.name] = body["person"]["id"]
                detail.append(f"{person.name} {body['accepted']}/{len(person.photos)} photos")
        with phase(console, "bundle") as detail:
            try:
                built = ship_bundle(self.server.state, models_dir, opts.work, client, topics, DEVICE_ID)
            except DemoError as exc:
                raise DemoError(f"{exc} ({self.door.describe()}; demo subscriber "
                                f"{'connected' if client.connected else 'NOT connected'})") from exc
            gallery = self.door.agent.gallery
            m = built.manifest
            detail.append(f"#{m.sequence} signed, {len(m.files)} files, {m.total_size / 1e6:.0f} MB over "
                          f"MQTT; {DEVICE_ID} installed it: {gallery.person_count} persons, gallery "
                          f"{gallery.version}")
            if gallery.person_count != len(ids):
                raise DemoError(f"the door's gallery has {gallery.person_count} persons, {len(ids)} were "
                                "enrolled")
        return cast, ids, events

    def scenes(self, cast: Cast, ids: dict[str, str], events: EventLog) -> None:
        """The scripted scenes; each one's verdict goes into the summary."""
        assert self.door is not None and self.camera is not None  # noqa: S101 - start() ran, replay camera
        director = Director(self.door.agent, self.camera, self.stage, events, FPS, TRACK_TIMEOUT_S)
        main_id = ids[cast.main.name]
        first = cast.main.name
        steps = [
            (Step("enrolled person", f"{cast.main.name} at the door, {len(cast.main.frames)} views",
                  DecisionKind.GRANTED, main_id, frozenset({DecisionKind.UNKNOWN, DecisionKind.SPOOF})),
             cast.main.frames),
            (Step("stranger", f"the stranger, {len(cast.stranger.frames)} views", DecisionKind.UNKNOWN,
                  forbidden=frozenset({DecisionKind.GRANTED, DecisionKind.SPOOF})), cast.stranger.frames),
        ]
        if cast.attack is not None:
            steps.append((Step("printed photo", f"a printed photo of {cast.attack_label}", DecisionKind.SPOOF,
                               forbidden=frozenset({DecisionKind.GRANTED})), cast.attack))
        for step, frames in steps:
            self.console.print(f"[bold]scene[/] {step.shown}: expecting {step.expected.value}")
            self.summary.steps.append(director.play(step, frames))
        step = Step("deleted person", f"{first} again, after deletion", DecisionKind.UNKNOWN,
                    forbidden=frozenset({DecisionKind.GRANTED}), label="deleted")
        self.summary.steps.append(step)
        try:
            step.note = self._delete(main_id)
        except DemoError as exc:
            step.error = str(exc)
            return
        self.console.print(f"[bold]scene[/] {step.shown}: expecting not granted")
        director.play(step, cast.main.frames)
        self._audited(events.count)

    def live(self) -> None:
        """With a real camera: check that it delivers frames (no scripted scenes follow)."""
        assert self.door is not None  # noqa: S101 - start() ran
        agent, camera = self.door.agent, self.opts.camera
        try:
            wait_until(lambda: agent.status().frames_captured > 0, f"camera {camera}", CAMERA_WAIT_S)
        except DemoError as exc:
            raise DemoError(f"camera {self.opts.camera} delivers no frames (OpenCV cannot open it?); give "
                            "another index or URL, or run without --camera for the scripted replay") from exc
        self.console.print(f"[green]✓[/] camera {self.opts.camera} delivers frames")

    def _audited(self, heard: int) -> None:
        """Check the server's audit subscriber stored every event the demo's subscriber heard."""
        assert self.api is not None  # noqa: S101 - start() ran
        api = self.api
        try:
            wait_until(lambda: api.event_count(DEVICE_ID) >= heard, "the audit log to store every event",
                       progress=lambda: api.event_count(DEVICE_ID), poll_s=HTTP_POLL_S)
        except DemoError:
            self.summary.error = (f"the server's audit log holds {api.event_count(DEVICE_ID)} of the {heard} "
                                  "events the door published")
            return
        self.console.print(f"[green]✓[/] audit log: the server stored all {heard} events (GET /api/events)")

    def _delete(self, person_id: str) -> str:
        """DELETE the person over HTTP and wait until the door confirmed the gallery removal."""
        assert self.door is not None and self.api is not None  # noqa: S101 - start() ran
        api = self.api
        wait_until(lambda: any(d["device_id"] == DEVICE_ID for d in api.devices()),
                   f"the server to know {DEVICE_ID}", poll_s=HTTP_POLL_S)
        started = time.monotonic()
        body = api.delete(person_id, DELETE_WAIT_S)
        if body["status"] != "confirmed":  # a busy door: keep waiting while it works through the delta
            updater = self.door.updater
            latest = [body]

            def confirmed() -> bool:
                latest[0] = api.deletion(body["id"])
                return bool(latest[0]["status"] == "confirmed")

            try:
                wait_until(confirmed, f"{DEVICE_ID} to confirm the deletion", DELETE_STALL_S,
                           lambda: (updater.last_ack.delta_sequence, updater.last_ack.delta_state),
                           HTTP_POLL_S)
            except DemoError as exc:
                state = latest[0]
                raise DemoError(f"deletion still {state['status']}: {exc}: {state['devices']}") from exc
            body = latest[0]
        door = next((d for d in body["devices"] if d["device_id"] == DEVICE_ID), None)
        if door is None or door["state"] != "confirmed":
            raise DemoError(f"the deletion did not wait for {DEVICE_ID}: {body['devices']}")
        if person_id in self.door.agent.gallery:
            raise DemoError("the door confirmed the deletion but its gallery still holds the person")
        return (f"DELETE answered 'confirmed' after {time.monotonic() - started:.1f} s: {door['device_id']} "
                f"{door.get('detail') or 'acked'}; its gallery no longer holds the person")
