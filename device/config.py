"""Device (door kiosk) configuration: pydantic models with ``extra="forbid"``, loaded from TOML.

Secrets come from the environment: ``FACEGATE_DEVICE__MQTT__PASSWORD=...`` overrides
``[mqtt] password``. Every field has bounds; cross-field rules live in validators.
"""

from __future__ import annotations

import datetime as dt
import re
import zoneinfo
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from core.config import DetectorConfig as DetectorConfig
from core.config import ModelsConfig, MqttConnection, Strict
from device.decide.operating_point import DEFAULT_DELTA, DEFAULT_TAU, lowest_tau_floor
from device.kiosk.config import KioskConfig
from facegate.configio import load_config

ENV_PREFIX = "FACEGATE_DEVICE"


class IdentityConfig(Strict):
    """Who this device is."""

    id: str = Field(
        "door-1",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Device id, used in MQTT topics.",
    )
    site: str = Field(
        "site",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Site id, used in MQTT topics.",
    )
    data_dir: Path = Field(Path("var/device"), description="Folder for gallery, outbox, bundles, logs.")


class ReplayCameraConfig(Strict):
    """Replay a folder of images or a video file."""

    type: Literal["replay"] = "replay"
    path: Path = Field(..., description="Folder of images (sorted by name) or a video file.")
    fps: float = Field(10.0, gt=0, le=240, description="Frames per second to emit.")
    loop: bool = Field(False, description="Start over at the end instead of stopping.")


class OpenCVCameraConfig(Strict):
    """A V4L2 device index or path, an RTSP/HTTP URL or a video file, read through OpenCV."""

    type: Literal["opencv"] = "opencv"
    source: str = Field(
        "0", min_length=1, description="Device index ('0'), /dev/videoN, rtsp://... or a file."
    )
    width: int | None = Field(None, ge=16, le=8192, description="Requested capture width.")
    height: int | None = Field(None, ge=16, le=8192, description="Requested capture height.")
    reconnect_initial_s: float = Field(0.5, gt=0, le=60, description="First reconnect delay.")
    reconnect_max_s: float = Field(10.0, gt=0, le=600, description="Reconnect backoff cap.")


class PiCameraConfig(Strict):
    """The Raspberry Pi camera through picamera2."""

    type: Literal["picamera2"] = "picamera2"
    width: int = Field(640, ge=16, le=4656, description="Preview width.")
    height: int = Field(480, ge=16, le=3496, description="Preview height.")


CameraConfig = Annotated[
    ReplayCameraConfig | OpenCVCameraConfig | PiCameraConfig, Field(discriminator="type")
]


class SimulatedDoorConfig(Strict):
    """A door that only logs and records its state."""

    type: Literal["simulated"] = "simulated"
    unlock_seconds: float = Field(5.0, gt=0, le=600, description="How long a grant keeps the door open.")
    state_file: Path | None = Field(
        None, description="Mirror the simulated relay's output into this file on every change, as a relay "
                          "outlives the process (tests, a display without a relay).",
    )


class GpioDoorConfig(Strict):
    """A relay on a GPIO pin through gpiozero."""

    type: Literal["gpio"] = "gpio"
    unlock_seconds: float = Field(5.0, gt=0, le=600, description="How long a grant keeps the door open.")
    pin: int = Field(17, ge=0, le=40, description="BCM pin of the relay.")
    active_high: bool = Field(True, description="Relay energises (unlocks) on a high level.")


DoorConfig = Annotated[SimulatedDoorConfig | GpioDoorConfig, Field(discriminator="type")]


class GalleryConfig(Strict):
    """FAISS gallery settings."""

    exact_max: int = Field(
        50_000, ge=1, description="Above this many templates switch from exact search to `approximate`."
    )
    approximate: Literal["ivf", "hnsw"] = Field(
        "ivf", description="Index above exact_max (`facegate bench gallery` measures both)."
    )
    ivf_nlist: int = Field(0, ge=0, le=1 << 18, description="IVF cells; 0 = auto (~4 sqrt(N), power of 2).")
    ivf_nprobe: int = Field(
        192, ge=1, le=1 << 16, description="IVF cells visited per search (192: recall@1 >= 0.99 up to 1M)."
    )
    hnsw_m: int = Field(32, ge=4, le=128, description="HNSW graph degree.")
    hnsw_ef_search: int = Field(64, ge=8, le=4096, description="HNSW search breadth.")
    hnsw_ef_construction: int = Field(80, ge=8, le=4096, description="HNSW build breadth.")
    top_k: int = Field(10, ge=2, le=1000, description="Templates fetched per search.")
    identity_score: Literal["mean", "max"] = Field(
        "mean", description="A person's score: cosine with the mean of their templates, or the best "
                            "template (`python -m server.evaluation.levers`: mean wins with several photos).",
    )


class DecisionConfig(Strict):
    """Open-set decision thresholds and tracking.

    ``tau`` and ``delta`` default to the calibrated operating point (device/decide/operating_point.py). A
    ``tau`` below the calibrated floor lets strangers in: it is refused here when it is below the floor of
    every gallery size, and at run time (gallery load and reload) when it is below the floor for the live
    gallery's size, unless ``acknowledge_low_tau`` is set; then every status surface shows the warning.
    """

    tau: float = Field(DEFAULT_TAU, ge=-1, le=1,
                       description="Cosine threshold; default: the calibrated open-set operating point.")
    delta: float = Field(DEFAULT_DELTA, ge=0, le=2, description="Minimum margin over the runner-up identity.")
    acknowledge_low_tau: bool = Field(
        False, description="Run with a tau below the calibrated floor (unsafe: shown on status, metrics, "
                           "doctor and Home Assistant).",
    )
    confirm_k: int = Field(2, ge=1, le=100, description="Frames that must agree before granting.")
    confirm_n: int = Field(3, ge=1, le=100, description="Window of frames for the k-of-n vote.")
    cooldown_s: float = Field(10.0, ge=0, le=3600, description="One event per person per this window.")
    track_timeout_s: float = Field(1.5, gt=0, le=60, description="A track ends after this long unseen.")
    fuse_frames: int = Field(
        1, ge=1, le=30,
        description="Search the mean embedding of the track's best-quality frames, up to this many "
                    "(1 = each frame alone; `python -m server.evaluation.levers` measures it).",
    )

    @model_validator(mode="after")
    def _k_le_n(self) -> DecisionConfig:
        if self.confirm_k > self.confirm_n:
            raise ValueError("confirm_k must be <= confirm_n")
        floor = lowest_tau_floor()
        if self.tau < floor and not self.acknowledge_low_tau:
            raise ValueError(
                f"[decision] tau = {self.tau:g} is below the calibrated floor {floor:g} for any gallery size "
                f"(strangers would be granted); leave tau out for the calibrated default {DEFAULT_TAU:g}, or "
                "set decision.acknowledge_low_tau = true to run it anyway (shown as a warning everywhere)"
            )
        return self


class QualityConfig(Strict):
    """Enrollment quality gates (shared with the server)."""

    min_face_px: int = Field(60, ge=16, le=4096, description="Minimum face box width for enrollment.")
    min_sharpness: float = Field(20.0, ge=0, description="Minimum variance of the Laplacian on the chip.")
    max_yaw_deg: float = Field(30.0, ge=0, le=90, description="Maximum |yaw| for enrollment.")
    max_pitch_deg: float = Field(25.0, ge=0, le=90, description="Maximum |pitch| for enrollment.")
    min_eye_aspect_ratio: float = Field(
        0.15, ge=0, le=1, description="Minimum eye aspect ratio of either eye (closed eyes ~0.1, open ~0.3)."
    )


# The shipped passive head and operating point: `facegate eval liveness-calibrate` on NUAA and
# Replay-Attack (train+devel) at once, BPCER budget 5% on each set (README, Liveness).
PASSIVE_HEAD = (0.410862, 0.473467, -0.110549, 0.244424, -3.286294)


# Old flat [liveness] keys (before issue 19) and where each one lives now: a config that still uses one
# gets this clear error instead of an "extra field" one.
MOVED_LIVENESS_KEYS = {
    "passive_missing": "[liveness.passive] missing",
    "passive_models": "[liveness.passive] models",
    "passive_threshold": "[liveness.passive] threshold",
    "uncertain_band": "[liveness.passive] uncertain_band",
    "passive_head": "[liveness.passive] head",
    "challenge_actions": "[liveness.challenge] actions",
    "challenge_timeout_s": "[liveness.challenge] timeout_s",
    "blink_closed_ratio": "[liveness.challenge] blink_closed_ratio",
    "blink_open_ratio": "[liveness.challenge] blink_open_ratio",
    "turn_deg": "[liveness.challenge] turn_deg",
    "neutral_deg": "[liveness.challenge] neutral_deg",
    "planar_threshold": "[liveness.planar] threshold",
    "planar_min_motion": "[liveness.planar] min_motion",
    "planar_min_frames": "[liveness.planar] min_frames",
    "planar_window": "[liveness.planar] window",
    "planar_required": "[liveness.planar] required",
}
# The three checks' old on/off keys, now tables: ``passive = true`` -> ``[liveness.passive] enabled``.
MOVED_LIVENESS_SWITCHES = {
    "passive": (bool, "[liveness.passive] enabled"),
    "challenge": (str, "[liveness.challenge] mode"),
    "planar": (bool, "[liveness.planar] enabled"),
}


class PassiveLivenessConfig(Strict):
    """``[liveness.passive]``: the MiniFASNet passive check (`facegate eval liveness-calibrate` sets it)."""

    enabled: bool = Field(True, description="Run the MiniFASNet passive check.")
    missing: Literal["challenge", "refuse"] = Field(
        "challenge",
        description="Without the MiniFASNet files: fall back to the active challenge on every face, or "
                    "refuse to start (`facegate models fetch-liveness` installs them).",
    )
    models: tuple[str, ...] = Field(
        ("minifasnet-2.7", "minifasnet-4.0"), min_length=1, max_length=2,
        description="Manifest names of the MiniFASNet models whose softmax outputs are averaged.",
    )
    threshold: float = Field(
        0.527165, ge=0, le=1,
        description="Passive score to pass (`facegate eval liveness-calibrate`: BPCER <= 5% on every set).",
    )
    uncertain_band: float = Field(
        1.387, ge=0, le=10,
        description="Half-width, in logit units, of the band around threshold that is uncertain.",
    )
    trained_head: Literal["auto", "off"] = Field(
        "auto",
        description="auto: score with the fine-tuned head when the models folder ships one (only a head the "
                    "registry's gate promoted reaches a bundle); off: always the MiniFASNet head below.",
    )
    head: tuple[float, ...] | None = Field(
        PASSIVE_HEAD,
        description="Logistic head on both MiniFASNets' logit margins (4 weights, then the bias; from "
                    "`facegate eval liveness-calibrate`); null = Minivision's mean softmax.",
    )

    @model_validator(mode="after")
    def _head(self) -> PassiveLivenessConfig:
        if self.head is not None and len(self.head) != 2 * len(self.models) + 1:
            raise ValueError(f"head needs {2 * len(self.models) + 1} numbers (2 weights per passive model, "
                             "then the bias)")
        return self


class ChallengeLivenessConfig(Strict):
    """``[liveness.challenge]``: the active challenge (blink or turn) and when it is asked for."""

    mode: Literal["never", "uncertain", "always"] = Field(
        "uncertain", description="Active challenge: on an uncertain passive score, on every face, or never."
    )
    actions: tuple[Literal["blink", "turn_left", "turn_right"], ...] = Field(
        ("blink", "turn_left", "turn_right"), min_length=1, description="Actions drawn at random."
    )
    timeout_s: float = Field(5.0, gt=0, le=60, description="Time to perform the action.")
    blink_closed_ratio: float = Field(
        0.6, gt=0, lt=1, description="Eyes closed below this fraction of the open eye aspect ratio."
    )
    blink_open_ratio: float = Field(
        0.85, gt=0, le=1, description="Eyes open again above this fraction of the open eye aspect ratio."
    )
    turn_deg: float = Field(20.0, gt=0, le=80, description="Yaw (degrees) a turn must exceed.")
    neutral_deg: float = Field(8.0, ge=0, le=40, description="Yaw below which the head faces the camera.")

    @model_validator(mode="after")
    def _thresholds(self) -> ChallengeLivenessConfig:
        if self.blink_closed_ratio >= self.blink_open_ratio:
            raise ValueError("blink_closed_ratio must be below blink_open_ratio")
        if self.neutral_deg >= self.turn_deg:
            raise ValueError("neutral_deg must be below turn_deg")
        return self


class PlanarLivenessConfig(Strict):
    """``[liveness.planar]``: the planar-attack geometry check over a track."""

    enabled: bool = Field(False, description="Run the planar-attack geometry check over the track.")
    threshold: float = Field(
        0.015, ge=0, le=1, description="Homography residual / face size below which motion is planar."
    )
    min_motion: float = Field(
        0.02, ge=0, le=1, description="Similarity residual a frame needs to count as planar evidence."
    )
    min_frames: int = Field(3, ge=1, le=1000, description="Evidence frames needed for a verdict.")
    window: int = Field(30, ge=2, le=1000, description="Frames kept per track for the planar check.")
    required: bool = Field(
        False, description="Count 'too little motion' from the planar check as uncertain, not ignore it."
    )


class LivenessConfig(Strict):
    """Liveness checks and fusion policy (device/liveness/; thresholds from `facegate eval liveness`).

    Secure by default: passive MiniFASNet with the active challenge on uncertain scores. A door with no
    check at all does not start unless ``required = false`` says so; it then shows "liveness off" on its
    status, metrics, ``facegate doctor`` and Home Assistant.
    """

    required: bool = Field(
        True, description="Refuse to start without a liveness check; false runs with no check (unsafe, shown "
                          "as 'liveness off' everywhere).",
    )
    uncertain_as: Literal["uncertain", "spoof"] = Field(
        "uncertain",
        description="What an unresolved uncertain verdict becomes: no grant (uncertain) or a spoof alarm; "
                    "never live.",
    )

    mesh_model: str = Field(
        "facemesh", min_length=1, description="Manifest name of the face mesh (else the packaged file)."
    )
    passive: PassiveLivenessConfig = Field(PassiveLivenessConfig(), description="[liveness.passive]")
    challenge: ChallengeLivenessConfig = Field(ChallengeLivenessConfig(), description="[liveness.challenge]")
    planar: PlanarLivenessConfig = Field(PlanarLivenessConfig(), description="[liveness.planar]")

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: object) -> object:
        if not isinstance(data, dict):
            return data
        for key, (kind, new) in MOVED_LIVENESS_SWITCHES.items():
            if isinstance(data.get(key), kind):
                raise ValueError(f"[liveness] {key} = {data[key]!r} moved to {new} (see the README's "
                                 "configuration migration note)")
        for key, new in MOVED_LIVENESS_KEYS.items():
            if key in data:
                raise ValueError(f"[liveness] {key} moved to {new} (see the README's configuration migration "
                                 "note)")
        return data

    @model_validator(mode="after")
    def _consistent(self) -> LivenessConfig:
        if self.required and not self.enabled:
            raise ValueError(
                "[liveness] has no check enabled ([liveness.passive] enabled = false, "
                "[liveness.challenge] mode = \"never\", [liveness.planar] enabled = false): a printed photo "
                "of an enrolled person would open the door. Enable [liveness.passive] (run `facegate models "
                "fetch-liveness`) or set [liveness.challenge] mode = \"always\"; to run without liveness "
                "anyway set [liveness] required = false (shown as 'liveness off' everywhere)"
            )
        if self.challenge.mode == "uncertain" and not self.passive.enabled:
            raise ValueError("[liveness.challenge] mode = \"uncertain\" reacts to the passive score, "
                             "but [liveness.passive] enabled = false: set mode = \"always\" (a challenge on "
                             "every face) or enable the passive check")
        return self

    @property
    def enabled(self) -> bool:
        """True when at least one liveness check runs."""
        return self.passive.enabled or self.planar.enabled or self.challenge.mode != "never"

    def without_passive(self) -> LivenessConfig:
        """This config with the passive check replaced by the active challenge on every face."""
        return self.model_copy(update={
            "passive": self.passive.model_copy(update={"enabled": False}),
            "challenge": self.challenge.model_copy(update={"mode": "always"}),
        })


class MqttConfig(MqttConnection):
    """Broker connection (the device keeps working when it is absent)."""

    enabled: bool = Field(False, description="Connect to a broker.")
    password: str | None = Field(None, description="Password; set FACEGATE_DEVICE__MQTT__PASSWORD.")
    homeassistant: bool = Field(True, description="Publish Home Assistant discovery configs.")
    snapshots: bool = Field(False, description="Opt-in: publish a JPEG for unknown/spoof events.")
    confirm_events: bool = Field(
        True, description="Keep each event in the outbox until the facegate server confirms it stored it, "
        "not only until the broker acknowledges it (correct on a broker restarted without persistence). "
        "Turn off only where no facegate server subscribes (e.g. Home Assistant alone).",
    )
    status_interval_s: float = Field(
        30.0, ge=1, le=3600, description="Retained status re-published this often."
    )
    command_max_age_s: float = Field(
        30.0, gt=0, le=3600,
        description="Commands whose `ts` is older than this (or this far in the future) are refused, as "
                    "are commands without `ts` and retained ones: a queued or replayed unlock never opens "
                    "the door.",
    )
    outbox_max_events: int = Field(
        100_000,
        ge=10,
        le=10_000_000,
        description="Outbox bound; beyond it the oldest event is evicted (logged).",
    )

    def password_text(self) -> str | None:
        """The password in clear for the client."""
        return self.password


class BundleConfig(Strict):
    """Signed bundle verification."""

    public_key: str | None = Field(None, description="Server Ed25519 public key (base64 or a file path).")
    enabled: bool = Field(True, description="Accept bundles and gallery deltas over MQTT (needs public_key).")
    keep: int = Field(2, ge=2, le=20, description="Installed bundles kept on disk (current + rollback).")
    request_batch: int = Field(64, ge=1, le=4096, description="Chunks asked for per ChunkRequest.")
    request_idle_s: float = Field(
        2.0, gt=0, le=600, description="Ask for missing chunks after this long without a new one."
    )
    require_sealed_gallery: bool = Field(
        True, description="Refuse bundles and deltas whose gallery is not sealed to this door (a downgrade). "
        "UNSAFE when false: only for a site whose server has [bundles] encrypt_gallery = false.")


class LoopConfig(Strict):
    """Frame loop queue."""

    queue_size: int = Field(4, ge=1, le=1024, description="Frames buffered between capture and processing.")
    drop: Literal["oldest", "newest"] = Field("oldest", description="Which frame to drop when full.")
    events_jsonl: Path | None = Field(None, description="Also write decisions as JSON lines here.")


class MetricsConfig(Strict):
    """Prometheus ``/metrics`` endpoint of the agent (device/metrics.py)."""

    enabled: bool = Field(False, description="Serve Prometheus metrics over HTTP.")
    host: str = Field(
        "127.0.0.1", min_length=1, max_length=255,
        description="Address to bind; 0.0.0.0 lets a Prometheus on another host scrape the door.",
    )
    port: int = Field(9108, ge=0, le=65535, description="Port to bind; 0 picks a free one (tests).")


Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
WEEKDAYS: tuple[Weekday, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
PersonId = Annotated[str, Field(min_length=1, max_length=128)]
_CLOCK = re.compile(r"^(?:[01]\d|2[0-3]):[0-5]\d$|^24:00$")
MINUTES_PER_DAY = 24 * 60


def clock_minutes(value: str) -> int:
    """Minutes after midnight of a validated ``HH:MM`` string (``24:00`` is 1440)."""
    hours, minutes = value.split(":")
    return int(hours) * 60 + int(minutes)


class AccessWindow(Strict):
    """A weekly window in which recognised persons may enter: ``[start, end)`` on each listed day."""

    days: tuple[Weekday, ...] = Field(
        WEEKDAYS, min_length=1, max_length=7, description="Days the window starts on: mon, tue, ... sun."
    )
    start: str = Field(..., description="Local start time HH:MM (inclusive), 00:00-23:59.")
    end: str = Field(..., description="Local end time HH:MM (exclusive); 24:00 is the end of the day.")
    overnight: bool = Field(
        False, description="The window runs past midnight and ends at `end` on the next day (22:00-06:00)."
    )

    @field_validator("days", mode="before")
    @classmethod
    def _lower_days(cls, value: object) -> object:
        if isinstance(value, list | tuple):
            return tuple(v.strip().lower() if isinstance(v, str) else v for v in value)
        return value

    @field_validator("start", "end", mode="before")
    @classmethod
    def _clock(cls, value: object) -> object:
        if isinstance(value, dt.time) and not (value.second or value.microsecond):  # TOML `start = 07:00:00`
            return f"{value.hour:02d}:{value.minute:02d}"
        if not isinstance(value, str) or not _CLOCK.match(value):
            raise ValueError(f"{value!r} is not a time of day: write HH:MM from 00:00 to 23:59 "
                             "(end may be 24:00)")
        return value

    @model_validator(mode="after")
    def _ordered(self) -> AccessWindow:
        start, end = self.start_minute, self.end_minute
        if start >= MINUTES_PER_DAY:
            raise ValueError("start must be 23:59 at the latest (24:00 is only valid as an end)")
        if self.overnight and not end < start:
            raise ValueError(f"an overnight window must end before its start time on the clock, got "
                             f"{self.start}-{self.end}; e.g. start = \"22:00\", end = \"06:00\"")
        if not self.overnight and not start < end:
            raise ValueError(f"start {self.start} must be before end {self.end}; for a window past midnight "
                             "set overnight = true")
        return self

    @property
    def start_minute(self) -> int:
        """Start in minutes after midnight."""
        return clock_minutes(self.start)

    @property
    def end_minute(self) -> int:
        """End in minutes after midnight (of the next day for an overnight window)."""
        return clock_minutes(self.end)


class AccessConfig(Strict):
    """Authorisation above recognition (device/decide/access.py): who may enter when.

    A recognised person who is blocked, or who arrives outside every schedule window without being
    always allowed, gets a ``denied`` event and the door stays locked.
    """

    timezone: str | None = Field(
        None, min_length=1, max_length=64,
        description="IANA time zone of the schedule (e.g. Europe/Berlin); default: the system's local zone.",
    )
    schedule: tuple[AccessWindow, ...] = Field(
        (), max_length=256, description="Windows in which recognised persons may enter; empty = always."
    )
    always_allowed: tuple[PersonId, ...] = Field(
        (), max_length=100_000, description="Person ids exempt from the schedule (security, facilities)."
    )
    blocked: tuple[PersonId, ...] = Field(
        (), max_length=100_000, description="Person ids recognised but always refused (a suspended badge)."
    )

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r}: use an IANA name such as 'Europe/Berlin' or "
                             "'UTC'") from exc
        return value

    @model_validator(mode="after")
    def _not_both(self) -> AccessConfig:
        both = sorted(set(self.always_allowed) & set(self.blocked))
        if both:
            raise ValueError(f"person ids both always_allowed and blocked: {', '.join(both[:5])}")
        return self


class DeviceConfig(Strict):
    """The whole device configuration."""

    device: IdentityConfig = IdentityConfig()
    camera: CameraConfig = Field(default_factory=lambda: OpenCVCameraConfig(), description="Frame source.")
    door: DoorConfig = Field(default_factory=lambda: SimulatedDoorConfig(), description="Door actuator.")
    models: ModelsConfig = ModelsConfig()
    detector: DetectorConfig = DetectorConfig()
    gallery: GalleryConfig = GalleryConfig()
    decision: DecisionConfig = DecisionConfig()
    quality: QualityConfig = QualityConfig()
    liveness: LivenessConfig = LivenessConfig()
    mqtt: MqttConfig = MqttConfig()
    bundle: BundleConfig = BundleConfig()
    loop: LoopConfig = LoopConfig()
    metrics: MetricsConfig = MetricsConfig()
    access: AccessConfig = AccessConfig()
    kiosk: KioskConfig = KioskConfig()


def config_warnings(config: DeviceConfig) -> list[str]:
    """Unsafe settings the config asks for explicitly (what `--validate-config` prints beside "OK")."""
    out = []
    if not config.liveness.enabled:
        out.append("liveness off ([liveness] required = false): a printed photo of an enrolled person opens "
                   "the door")
    if config.decision.tau < lowest_tau_floor():
        floor = lowest_tau_floor()
        out.append(f"decision.tau {config.decision.tau:g} is below the calibrated floor {floor:g} "
                   "(acknowledged)")
    if config.kiosk.enabled and not config.kiosk.loopback:
        out.append(f"kiosk.host {config.kiosk.host} is not loopback: other machines can watch the door "
                   "camera's preview")
    return out


def load_device_config(path: Path | None, environ: dict[str, str] | None = None) -> DeviceConfig:
    """Load and validate a device config (raises ``facegate.configio.ConfigError``)."""
    return load_config(DeviceConfig, path, ENV_PREFIX, environ)
