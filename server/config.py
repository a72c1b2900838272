"""Server configuration: pydantic models with ``extra="forbid"``, loaded from TOML plus the environment.

Secrets come from the environment, never from a committed file:
``FACEGATE_SERVER__CRYPTO__CHIP_KEY`` (base64 of 32 bytes), ``FACEGATE_SERVER__AUTH__BOOTSTRAP_PASSWORD``,
``FACEGATE_SERVER__MQTT__PASSWORD``. Every field has bounds; cross-field rules live in validators.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator

from core.config import ModelsConfig, MqttConnection, Strict
from device.config import DetectorConfig, QualityConfig
from facegate.configio import load_config
from server.style.config import StyleConfig

ENV_PREFIX = "FACEGATE_SERVER"
CHIP_KEY_BYTES = 32  # AES-256-GCM
DB_FILE_NAME = "facegate.db"
ID_PATTERN = r"^[A-Za-z0-9_.-]+$"


def _is_loopback(host: str) -> bool:
    """Whether ``host`` names only the loopback interface."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class HttpConfig(Strict):
    """Where the API and the web station listen."""

    host: str = Field("127.0.0.1", min_length=1, description="Bind address (0.0.0.0 for every interface).")
    port: int = Field(8080, ge=1, le=65535, description="TCP port.")
    secure_cookies: bool = Field(
        True, description="Mark the session cookie Secure and send HSTS (default: on unless bound to "
                          "loopback; set false only for plain HTTP on a trusted network).",
    )

    @model_validator(mode="before")
    @classmethod
    def _secure_unless_loopback(cls, data: object) -> object:
        """secure_cookies not given: off only when the server listens on loopback alone."""
        if isinstance(data, dict) and "secure_cookies" not in data:
            host = str(data.get("host", "127.0.0.1"))
            data = {**data, "secure_cookies": not _is_loopback(host)}
        return data


class DatabaseConfig(Strict):
    """SQLite in WAL mode by default; a SQLAlchemy URL switches to PostgreSQL."""

    url: str | None = Field(
        None,
        description="SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db; default: SQLite in data_dir.",
    )
    echo: bool = Field(False, description="Log every SQL statement (debugging only).")
    busy_timeout_ms: int = Field(5000, ge=0, le=600_000, description="SQLite busy timeout.")

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("sqlite", "postgresql")):
            raise ValueError("database url must start with sqlite or postgresql")
        return value


class CryptoConfig(Strict):
    """Key for the aligned chips stored encrypted at rest (AES-256-GCM). Never stored in the database."""

    chip_key: SecretStr | None = Field(
        None, description="Base64 of 32 random bytes; set FACEGATE_SERVER__CRYPTO__CHIP_KEY."
    )
    chip_key_file: Path | None = Field(
        None, description="File holding the base64 key; default <data_dir>/keys/chip.key."
    )
    create_key_file: bool = Field(
        True, description="Create the key file (mode 0600) on first start when no key is configured."
    )

    @field_validator("chip_key")
    @classmethod
    def _key_shape(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            try:
                raw = base64.b64decode(value.get_secret_value(), validate=True)
            except (binascii.Error, ValueError) as exc:
                raise ValueError("chip_key must be base64") from exc
            if len(raw) != CHIP_KEY_BYTES:
                raise ValueError(f"chip_key must decode to {CHIP_KEY_BYTES} bytes, got {len(raw)}")
        return value


class MqttConfig(MqttConnection):
    """Broker the audit subscriber listens to and the gallery deltas go through."""

    enabled: bool = Field(True, description="Connect to the broker (the API keeps working without it).")
    site: str = Field("site", min_length=1, max_length=64, pattern=ID_PATTERN, description="Site id.")
    client_id: str = Field(
        "facegate-server", min_length=1, max_length=64, pattern=ID_PATTERN,
        description="MQTT client id (persistent session: events queue while the server is down).",
    )
    password: SecretStr | None = Field(None, description="Password; set FACEGATE_SERVER__MQTT__PASSWORD.")
    share_group: str | None = Field(
        None, min_length=1, max_length=64, pattern=ID_PATTERN,
        description="Run as one of several server replicas: ingest (events, status, acks) and chunk "
        "requests arrive through the MQTT v5 shared subscription $share/<group>/..., so each message "
        "reaches one replica. Every replica needs its own client_id, the same database (PostgreSQL) and "
        "the same data_dir (bundles, delta ledger, gallery keys). Needs a broker with shared "
        "subscriptions (mosquitto >= 1.6).",
    )
    deletion_ack_timeout_s: float = Field(
        30.0, gt=0, le=86_400,
        description="How long a DELETE waits for device acks before answering 'pending' (202).",
    )

    def password_text(self) -> str | None:
        """The password in clear for the client."""
        return self.password.get_secret_value() if self.password else None


class BundlesConfig(Strict):
    """Signed bundles and gallery deltas (see ``facegate keys generate``)."""

    signing_key: Path | None = Field(
        None, description="Ed25519 private key (PEM, mode 0600); default <data_dir>/keys/bundle.key."
    )
    root: Path | None = Field(None, description="Bundles and the delta ledger; default <data_dir>/bundles.")
    encrypt_gallery: bool = Field(
        True, description="Seal the gallery of bundles and deltas to the site's doors (names and templates "
        "never cross the broker in plaintext). UNSAFE when false.")
    trust_new_doors: bool = Field(
        True, description="Wrap the gallery key to a door the first time it reports its public key (trust "
        "on first use; the broker ACL lets only a door's certificate write its ack). False: every new door "
        "waits for `facegate bundle approve-door` (use it on a broker without per-door ACLs).")


class AuthConfig(Strict):
    """Bearer tokens, web sessions and the first admin."""

    token_ttl_s: int = Field(8 * 3600, ge=60, le=30 * 86_400, description="Login token lifetime.")
    bootstrap_admin: str | None = Field(
        "admin", min_length=1, max_length=64, pattern=ID_PATTERN,
        description="Admin created on first start when no user exists (needs bootstrap_password).",
    )
    bootstrap_password: SecretStr | None = Field(
        None, description="Set FACEGATE_SERVER__AUTH__BOOTSTRAP_PASSWORD; ignored once users exist."
    )
    min_password_length: int = Field(10, ge=8, le=256, description="Shortest password accepted.")
    login_per_minute: float = Field(
        10.0, gt=0, le=10_000,
        description="Failed login attempts per client address per minute (any user name).",
    )
    login_global_per_minute: float = Field(
        120.0, gt=0, le=100_000,
        description="Failed login attempts per minute from all addresses together (bounds argon2 work).",
    )
    failed_login_audit_s: float = Field(
        60.0, ge=1, le=86_400,
        description="Failed logins from one address are summed into one audit row per this many seconds.",
    )


class RateLimitConfig(Strict):
    """Token bucket per user for enroll, verify and identify."""

    per_minute: float = Field(60.0, gt=0, le=100_000, description="Sustained requests per user per minute.")
    burst: int = Field(20, ge=1, le=10_000, description="Requests a user may make at once.")


class UploadConfig(Strict):
    """Limits on uploaded images (checked before decoding)."""

    max_bytes: int = Field(8 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024, description="Largest file.")
    max_pixels: int = Field(
        24_000_000, ge=64 * 64, le=400_000_000, description="Largest width x height (decompression bombs)."
    )
    max_files: int = Field(10, ge=1, le=100, description="Images per enrollment request.")


class RecognitionConfig(Strict):
    """Thresholds for verify, identify, the duplicate check and the self-consistency flag."""

    tau: float = Field(0.5, ge=-1, le=1, description="Cosine threshold for verify/identify (same as doors).")
    duplicate_tau: float | None = Field(
        None, ge=-1, le=1, description="Cosine above which a new face duplicates another person; default tau."
    )
    consistency_tau: float | None = Field(
        None, ge=-1, le=1,
        description="Mean cosine to the person's other templates below which one is flagged; default tau.",
    )
    top_k: int = Field(5, ge=1, le=100, description="Default number of identities returned by identify.")
    require_consent: bool = Field(True, description="Refuse enrollment without the consent flag.")

    @property
    def duplicate_threshold(self) -> float:
        """Effective duplicate-check threshold."""
        return self.tau if self.duplicate_tau is None else self.duplicate_tau

    @property
    def consistency_threshold(self) -> float:
        """Effective self-consistency threshold."""
        return self.tau if self.consistency_tau is None else self.consistency_tau


class ServerConfig(Strict):
    """The whole server configuration."""

    data_dir: Path = Field(Path("var/server"), description="Database, key file and other state.")
    http: HttpConfig = HttpConfig()
    database: DatabaseConfig = DatabaseConfig()
    crypto: CryptoConfig = CryptoConfig()
    mqtt: MqttConfig = MqttConfig()
    bundles: BundlesConfig = BundlesConfig()
    auth: AuthConfig = AuthConfig()
    rate_limit: RateLimitConfig = RateLimitConfig()
    upload: UploadConfig = UploadConfig()
    recognition: RecognitionConfig = RecognitionConfig()
    models: ModelsConfig = ModelsConfig()
    detector: DetectorConfig = DetectorConfig()
    quality: QualityConfig = QualityConfig()
    style: StyleConfig | None = Field(
        None, description="Set to enable the style-transfer API under /api/style (admins only)."
    )

    @property
    def database_url(self) -> str:
        """The configured URL or SQLite in ``data_dir``."""
        if self.database.url:
            return self.database.url
        return f"sqlite:///{(self.data_dir / DB_FILE_NAME).resolve()}"

    @property
    def signing_key_path(self) -> Path:
        """The bundle/delta signing key (configured or default)."""
        return self.bundles.signing_key or self.data_dir / "keys" / "bundle.key"

    @property
    def bundles_root(self) -> Path:
        """Where bundles and the gallery-delta ledger live."""
        return self.bundles.root or self.data_dir / "bundles"

    @property
    def chip_key_path(self) -> Path:
        """The key file path (configured or default)."""
        return self.crypto.chip_key_file or self.data_dir / "keys" / "chip.key"


def load_server_config(path: Path | None, environ: dict[str, str] | None = None) -> ServerConfig:
    """Load and validate a server config (raises ``facegate.configio.ConfigError``)."""
    return load_config(ServerConfig, path, ENV_PREFIX, environ)
