"""Everything a request handler needs, built once per app from the config and closed in reverse order."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from core.protocol.topics import Topics
from server.audit.receipts import Receipts
from server.audit.subscriber import AuditSubscriber
from server.audit.transport import ManualAckSource
from server.auth.ratelimit import FailureAggregator, TokenBucket
from server.auth.service import bootstrap_admin
from server.config import ServerConfig
from server.crypto import ChipCipher, load_chip_cipher
from server.db.session import Database
from server.enrollment.deletion import DeletionService
from server.enrollment.index import EnrollmentIndex
from server.enrollment.recognition import RecognitionEngine
from server.enrollment.service import EnrollmentService
from server.enrollment.sync import GallerySync, NullSync
from server.registry.gate import PromotionHook
from server.registry.model_folder import active_models_dir
from server.rowbinding import bind_chip_rows

if TYPE_CHECKING:
    from server.bundles.publisher import BundleServer
    from server.bundles.sitekeys import SiteKeyring

logger = logging.getLogger(__name__)


class Closable(Protocol):
    """Anything with an idempotent ``close()``."""

    def close(self) -> None:
        """Release resources."""


def mqtt_gallery_sync(config: ServerConfig, topics: Topics,
                      cipher: ChipCipher | None = None) -> tuple[GallerySync, Closable | None]:
    """Signed gallery deltas over MQTT when MQTT is on and a signing key exists, else NullSync; sealed to
    the site's doors unless ``[bundles] encrypt_gallery`` is off."""
    if not config.mqtt.enabled:
        return NullSync(), None
    key_path = config.signing_key_path
    if not key_path.is_file():
        logger.warning("no signing key at %s: gallery deltas are not published, deletions stay pending "
                       "(run `facegate keys generate`)", key_path)
        return NullSync(), None
    from core.mqtt.client import MqttClient, settings_from
    from server.bundles.delta import MqttGallerySync
    from server.bundles.signing import load_private_key

    key = load_private_key(key_path)
    cipher = cipher or load_chip_cipher(config)
    keyring = site_keyring(config, cipher)
    settings = settings_from(config.mqtt, f"{config.mqtt.client_id}-delta")
    client = MqttClient(settings).start()
    try:
        return MqttGallerySync(client, topics, config.bundles_root, key, keyring, cipher), client
    except BaseException:
        client.close()
        raise


def site_keyring(config: ServerConfig, cipher: ChipCipher) -> SiteKeyring | None:
    """The site's gallery keyring, or None (with a loud warning) when gallery encryption is turned off."""
    from server.bundles.sitekeys import SiteKeyring

    if not config.bundles.encrypt_gallery:
        logger.warning("UNSAFE: [bundles] encrypt_gallery is off: enrolled names and templates cross the "
                       "broker in plaintext")
        return None
    return SiteKeyring(config.bundles_root, cipher, config.mqtt.site,
                       trust_new_doors=config.bundles.trust_new_doors)


@dataclass
class AppState:
    """Database, cipher, engine, services, limiters and the MQTT side of one server instance."""

    config: ServerConfig
    db: Database
    cipher: ChipCipher
    engine: RecognitionEngine
    index: EnrollmentIndex
    sync: GallerySync
    enrollment: EnrollmentService
    deletions: DeletionService
    topics: Topics
    limiter: TokenBucket
    login_limiter: TokenBucket
    login_global: TokenBucket
    failed_logins: FailureAggregator
    audit: AuditSubscriber | None = None
    source: ManualAckSource | None = None
    bundles: BundleServer | None = None  # answers chunk requests and offers the published bundle
    extra_closers: list[Closable] = field(default_factory=list)
    # The promotion hooks bound to this state (server.app fills them); pass them to gate.promote/rollback.
    promotion_hooks: dict[str, PromotionHook] = field(default_factory=dict)
    _closed: bool = field(default=False, repr=False)

    @classmethod
    def build(cls, config: ServerConfig, engine: RecognitionEngine | None = None,
              sync: GallerySync | None = None) -> AppState:
        """Open and migrate the database (refusing a newer one), load the chip key, wire the services."""
        db = Database(config.database_url, config.database.echo, config.database.busy_timeout_ms)
        try:
            db.migrate()
        except BaseException:
            db.close()
            raise
        cipher = load_chip_cipher(config)
        bind_chip_rows(db, cipher)  # idempotent: chips sealed before the person binding get it now
        owns_engine = engine is None
        # The registry's promoted embedder (its composed models folder) wins over [models] dir.
        engine = engine or RecognitionEngine.from_config(config, active_models_dir(config, db))
        index = EnrollmentIndex(cipher)
        topics = Topics(config.mqtt.prefix, config.mqtt.site)
        closers: list[Closable] = []
        if sync is None:
            sync, client = mqtt_gallery_sync(config, topics, cipher)
            closers += [client] if client is not None else []
        password = config.auth.bootstrap_password
        secret = password.get_secret_value() if password else None
        with db.transaction() as session:
            bootstrap_admin(session, config.auth.bootstrap_admin, secret, config.auth.min_password_length)
        return cls(
            config=config, db=db, cipher=cipher, engine=engine, index=index, sync=sync,
            enrollment=EnrollmentService(config, engine, cipher, index, sync),
            deletions=DeletionService(db, index, sync),
            topics=topics, extra_closers=closers + ([engine] if owns_engine else []),
            limiter=TokenBucket(config.rate_limit.per_minute, config.rate_limit.burst),
            login_limiter=TokenBucket(config.auth.login_per_minute,
                                      max(1, int(config.auth.login_per_minute))),
            login_global=TokenBucket(config.auth.login_global_per_minute,
                                     max(1, int(config.auth.login_global_per_minute))),
            failed_logins=FailureAggregator(config.auth.failed_login_audit_s),
        )

    def start_mqtt(self) -> None:
        """Start the audit subscriber and its broker connection (no-op when MQTT is disabled)."""
        if not self.config.mqtt.enabled or self.audit is not None:
            return
        if self.config.mqtt.share_group and self.db.is_sqlite:
            logger.warning("[mqtt] share_group %s on SQLite: replicas take turns writing one file (and must "
                           "run on this machine); use PostgreSQL for replicas", self.config.mqtt.share_group)
        from server.bundles.delta import MqttGallerySync

        rebaser = None
        door_keys = None
        if isinstance(self.sync, MqttGallerySync):  # NullSync publishes nothing, so has nothing to rebase
            from server.bundles.offers import OfferKeeper
            from server.bundles.publisher import BundleServer
            from server.bundles.rebase import DeltaRebaser

            rebaser = DeltaRebaser(self.db, self.sync, self.config.bundles_root).start()
            door_keys = self.sync.observe_doors  # a door's hello carries its key: wrap the gallery key to it
            # Never assume the broker kept the retained delta or announcement: offer them again on
            # reconnect, to doors that say hello behind, and periodically; and answer chunk requests.
            offers = OfferKeeper(self.sync.client, self.topics, [self.sync]).start()
            self.bundles = BundleServer(self.sync.client, self.topics, self.config.bundles_root,
                                        share_group=self.config.mqtt.share_group).start()
            self.extra_closers[:0] = [rebaser, offers, self.bundles]
        # Doors keep each event until its receipt (server.audit.receipts); on every (re)subscription
        # they hear the server is listening again.
        receipts = Receipts(self.db, self.topics, self._publish_receipt)
        self.audit = AuditSubscriber(self.db, self.topics, on_delta_acks=self.deletions.on_acks,
                                     after_commit=self.deletions.notify,
                                     on_running_bundles=rebaser.request if rebaser else None,
                                     on_events_stored=receipts.stored,
                                     on_door_keys=door_keys).start()
        self.source = ManualAckSource(self.config.mqtt, self.audit.filters, self.audit.handle,
                                      on_subscribed=receipts.hello).start()

    def _publish_receipt(self, topic: str, payload: bytes) -> None:
        """Receipts leave through the audit subscriber's own connection."""
        if self.source is not None:
            self.source.publish(topic, payload)

    def close(self) -> None:
        """Stop MQTT, the writer, the engine and the database (idempotent)."""
        if self._closed:
            return
        self._closed = True
        # An engine passed in by the caller is the caller's to close; one built here is in extra_closers.
        for closer in (self.source, self.audit, *self.extra_closers, self.sync, self.db):
            if closer is not None:
                try:
                    closer.close()
                except Exception:
                    logger.exception("closing %s failed", type(closer).__name__)
