"""``facegate device run`` with MQTT: the agent, its MQTT side and the bundle updater wired together.

Models and gallery come from the active bundle when one is installed (re-resolved on every reload, so
a new bundle or gallery delta takes effect through ``Agent.reload``), else from the config.
"""

from __future__ import annotations

import logging

from device.agent.loop import Loader, Models
from device.agent.runner import build_agent, default_loader, run_agent
from device.bundles.signing import BundleKeyError, load_public_key
from device.bundles.store import ActiveBundle, BundleStore
from device.bundles.updater import BundleUpdater
from device.config import DeviceConfig
from device.metrics import DeviceMetrics
from device.mqtt.service import DeviceMqtt

logger = logging.getLogger(__name__)

EXIT_FAILED = 1


def open_store(config: DeviceConfig) -> BundleStore | None:
    """The bundle store of this device, or None when bundles are disabled."""
    if not config.bundle.enabled:
        return None
    key = None
    if config.bundle.public_key is None:
        logger.warning("no [bundle] public_key pinned: every bundle and gallery delta will be refused")
    else:
        key = load_public_key(config.bundle.public_key)
    return BundleStore(config.device.data_dir / "bundles", key, gallery_config=config.gallery,
                       keep=config.bundle.keep)


def bundle_loader(config: DeviceConfig, store: BundleStore) -> Loader:
    """A loader that opens the active bundle's models and working gallery (config paths without one)."""

    def load() -> Models:
        active = store.active()
        if active is None:
            return default_loader(config)()
        return default_loader(config, active.models_dir, active.working_gallery)()

    return load


def run_connected(config: DeviceConfig) -> int:
    """Run the agent with MQTT events, status, commands and bundles until SIGTERM/SIGINT."""
    try:
        store = open_store(config)
    except BundleKeyError as exc:
        logger.error("cannot start: %s", exc)
        return EXIT_FAILED
    if store is not None:
        active = store.recover()
        logger.info("active bundle: %s", active.sequence if active else "none (models from the config)")
    try:
        agent = build_agent(config, loader=bundle_loader(config, store) if store is not None else None)
    except Exception as exc:  # models, gallery or door could not be opened: say why and exit non-zero
        logger.error("agent cannot start: %s", exc)
        return EXIT_FAILED

    def reload(_bundle: ActiveBundle) -> None:
        agent.reload()

    mqtt = DeviceMqtt(config, agent)
    agent.add_sink(mqtt.sink)
    updater = None
    if store is not None:
        updater = BundleUpdater(mqtt.client, mqtt.topics, config.device.id, store, config.bundle,
                                on_installed=reload, on_gallery_changed=reload)
        mqtt.attach_updater(updater)
    metrics = DeviceMetrics()
    metrics.observe_mqtt(mqtt.outbox, updater, mqtt.snapshots)
    mqtt.start()
    if updater is not None:
        updater.start()
    try:
        # run_agent stops the metrics endpoint before the outbox below is closed
        return run_agent(config, agent, metrics)
    finally:
        if updater is not None:
            updater.close()
        mqtt.close()
