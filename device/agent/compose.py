"""The one composition root of a door: ``facegate device run`` for a standalone and a connected door.

``run_door`` locks the door first (fail-secure restart), then wires what the config asks for:

- standalone (``[mqtt] enabled = false``): models and gallery from the config, decisions to JSON lines,
  reloads when ``facegate device enroll`` changes the gallery on disk;
- connected: the same agent, with models and gallery from the active bundle when one is installed, plus
  the MQTT side (events through the outbox, status, commands, Home Assistant) and the bundle updater.

Both then run under ``device.agent.runner.run_agent`` (signals, metrics endpoint) until SIGTERM/SIGINT.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from device.agent.runner import EXIT_FAILED, build_agent, open_door, run_agent
from device.config import DeviceConfig

if TYPE_CHECKING:
    from device.agent.loop import Agent
    from device.bundles.store import ActiveBundle

logger = logging.getLogger(__name__)


def use_bundle_liveness(agent: Agent, config: DeviceConfig, bundle: ActiveBundle) -> None:
    """Score the passive check with the trained head the bundle ships (or MiniFASNet's when it ships
    none); a head that cannot be loaded keeps the running scorer and is logged."""
    from device.liveness.fusion import refresh_trained_head
    from device.liveness.passive import PassiveModelError
    from models.runtime.interpreter import ModelLoadError

    try:
        if refresh_trained_head(agent.liveness, config.liveness, bundle.models_dir, config.models.threads):
            logger.warning("bundle %d: passive liveness scorer changed (trained head %s)", bundle.sequence,
                           "on" if getattr(getattr(agent.liveness, "passive", None), "trained", None)
                           else "off")
    except (PassiveModelError, ModelLoadError) as exc:
        logger.error("bundle %d: its liveness head cannot be used, keeping the running scorer: %s",
                     bundle.sequence, exc)


def run_door(config: DeviceConfig) -> int:
    """Build the door the config describes (standalone or connected), run it; return the exit code."""
    if not config.mqtt.enabled:
        return run_agent(config)
    from device.bundles.signing import BundleKeyError
    from device.bundles.updater import BundleUpdater
    from device.metrics import DeviceMetrics
    from device.mqtt.runtime import bundle_loader, make_delta_live, open_store
    from device.mqtt.service import DeviceMqtt

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

    def reload(bundle: ActiveBundle) -> None:
        agent.reload()
        use_bundle_liveness(agent, config, bundle)

    if store is not None and (active := store.active()) is not None:
        use_bundle_liveness(agent, config, active)

    mqtt = DeviceMqtt(config, agent)
    agent.add_sink(mqtt.sink)
    updater = None
    if store is not None:
        updater = BundleUpdater(mqtt.client, mqtt.topics, config.device.id, store, config.bundle,
                                on_installed=reload,
                                on_gallery_changed=make_delta_live(agent))
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
