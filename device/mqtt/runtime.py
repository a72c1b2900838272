"""The connected door's parts: the bundle store, the bundle loader and the gallery-delta hook.

Models and gallery come from the active bundle when one is installed (re-resolved on every reload, so
a new bundle or gallery delta takes effect through ``Agent.reload``), else from the config. They are
wired by the one composition root, ``device.agent.compose.run_door``.
"""

from __future__ import annotations

import logging

from core.protocol.schemas import DeltaState, GalleryDelta
from device.agent.loop import Agent, AgentError, Loader
from device.agent.runner import default_loader
from device.bundles.doorkey import DoorKeys
from device.bundles.signing import load_public_key
from device.bundles.store import ActiveBundle, BundleStore
from device.bundles.updater import DeltaHook
from device.config import DeviceConfig
from device.pipeline.frame import Models

logger = logging.getLogger(__name__)


def open_store(config: DeviceConfig) -> BundleStore | None:
    """The bundle store of this device, or None when bundles are disabled."""
    if not config.bundle.enabled:
        return None
    key = None
    if config.bundle.public_key is None:
        logger.warning("no [bundle] public_key pinned: every bundle and gallery delta will be refused")
    else:
        key = load_public_key(config.bundle.public_key)
    if not config.bundle.require_sealed_gallery:
        logger.warning("UNSAFE: bundle.require_sealed_gallery is off: plaintext galleries (names and "
                       "templates readable on the broker) are accepted")
    root = config.device.data_dir / "bundles"
    return BundleStore(root, key, gallery_config=config.gallery, keep=config.bundle.keep,
                       door=DoorKeys(root, config.device.id),
                       require_sealed=config.bundle.require_sealed_gallery)


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
