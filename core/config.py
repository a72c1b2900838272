"""Config bases both configs share: the strict section base, the broker connection and the models section.

TOML keys and environment variable names stay those of each side (``FACEGATE_DEVICE__MQTT__HOST``,
``FACEGATE_SERVER__MQTT__HOST``); only the definitions live here once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Strict(BaseModel):
    """Base for every config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class MqttConnection(Strict):
    """Broker connection fields common to the device's and the server's ``[mqtt]`` sections."""

    host: str = Field("localhost", min_length=1, description="Broker host.")
    port: int = Field(1883, ge=1, le=65535, description="Broker port.")
    prefix: str = Field("facegate", min_length=1, pattern=r"^[A-Za-z0-9_-]+$", description="Topic prefix.")
    username: str | None = Field(None, description="Username (use the env for the password).")
    tls: bool = Field(False, description="Use TLS.")
    ca_file: Path | None = Field(None, description="CA certificate for TLS.")
    cert_file: Path | None = Field(None, description="Client certificate.")
    key_file: Path | None = Field(None, description="Client key.")
    keepalive_s: int = Field(30, ge=5, le=3600, description="MQTT keepalive.")

    def password_text(self) -> str | None:
        """The password in clear for the client (None without one); each side declares its field."""
        return None

    @model_validator(mode="after")
    def _tls_files(self) -> MqttConnection:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be given together")
        return self


class ModelsConfig(Strict):
    """Where the active models live and how to run them (the doors and the enrollment station alike)."""

    dir: Path | None = Field(None, description="Folder with manifest.json; default: the built models.")
    threads: int = Field(1, ge=1, le=64, description="Interpreter threads (1 = edge-like).")
    embedder: Literal["int8", "float32"] = Field("int8", description="Embedder variant (match the doors).")


class DetectorConfig(Strict):
    """BlazeFace detector settings."""

    variant: Literal["short", "full"] = Field("short", description="short-range (<2 m) or full-range.")
    score_threshold: float = Field(0.6, ge=0, le=1, description="Minimum face score.")
    nms_iou: float = Field(0.3, ge=0, le=1, description="IoU for weighted NMS.")
    min_face_px: int = Field(40, ge=8, le=4096, description="Ignore faces narrower than this.")
