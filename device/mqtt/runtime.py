"""``facegate device run`` with MQTT: the agent, its MQTT side and the bundle updater wired together.

Models and gallery come from the active bundle when one is installed (re-resolved on every reload, so
a new bundle or gallery delta takes effect through ``Agent.reload``), else from the config.
"""

from __future__ import annotations

import logging

from device.agent.loop import Agent, AgentError, Loader, Models
from device.agent.runner import build_agent, default_loader, open_door, run_agent
from device.bundles.signing import BundleKeyError, load_public_key
from device.bundles.store import ActiveBundle, BundleStore
from device.bundles.updater import BundleUpdater, DeltaHook
from device.config import DeviceConfig
from device.metrics import DeviceMetrics
from device.mqtt.service import DeviceMqtt
from device.protocol.schemas import DeltaState, GalleryDelta

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


class DeletionNotLive(Exception):
    """Persons a delta removes are still in the running door's gallery."""


def make_delta_live(agent: Agent) -> DeltaHook:
    """The hook that makes an accepted gallery delta live: removals in place, then a reload for the adds.

    Removals go first and in place, so a deletion holds even when the reload fails; the ack then says
    ``removals_only`` with the reason. Persons still in the live gallery raise (acked ``rejected``).
    """

    def hook(_bundle: ActiveBundle, delta: GalleryDelta) -> tuple[DeltaState, str] | None:
        still = agent.remove_persons(delta.remove)
        if still:
            raise DeletionNotLive(f"{len(still)} removed person(s) still in the live gallery")
        try:
            agent.reload()
        except AgentError as exc:
            return "removals_only", f"removals applied in the live gallery; adds not loaded: {exc}"
        return None

    return hook


def run_connected(config: DeviceConfig) -> int:
    """Run the agent with MQTT events, status, commands and bundles until SIGTERM/SIGINT."""
    try:
        door = open_door(config)  # locked before bundle recovery and model loading (fail-secure restart)
    except Exception as exc:
        logger.error("agent cannot start: the door cannot be driven: %s", exc)
        return EXIT_FAILED
    try:
        store = open_store(config)
        if store is not None:
            active = store.recover()
            logger.info("active bundle: %s", active.sequence if active else "none (models from the config)")
        agent = build_agent(config, loader=bundle_loader(config, store) if store is not None else None,
                            door=door)
    except BundleKeyError as exc:
        door.close()
        logger.error("cannot start: %s", exc)
        return EXIT_FAILED
    except Exception as exc:  # models, gallery or liveness could not be opened: say why and exit non-zero
        door.close()
        logger.error("agent cannot start: %s", exc)
        return EXIT_FAILED

    def reload(_bundle: ActiveBundle) -> None:
        agent.reload()

    mqtt = DeviceMqtt(config, agent)
    agent.add_sink(mqtt.sink)
    updater = None
    if store is not None:
        updater = BundleUpdater(mqtt.client, mqtt.topics, config.device.id, store, config.bundle,
                                on_installed=reload, on_gallery_changed=make_delta_live(agent))
        mqtt.attach_updater(updater)
    metrics = DeviceMetrics()
    metrics.observe_mqtt(mqtt.outbox, updater, mqtt.snapshots)
    mqtt.start()
    if updater is not None:
        updater.start()
    try:
        # run_agent stops the metrics endpoint before the outbox below is closed
        return run_agent(config, agent, metrics, online=lambda: mqtt.client.connected)
    finally:
        if updater is not None:
            updater.close()
        mqtt.close()
