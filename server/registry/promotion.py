"""The real promotion hooks: re-embed the gallery from the stored chips, then build and sign a bundle.

:func:`promotion_hooks` binds them to the server context they need (database, chip key, config, models);
``facegate models promote|rollback`` and the server app pass the result to ``gate.promote``/``rollback``
explicitly; without it the gate's defaults fail the promotion. For the version that becomes active (the
candidate on promote, the restored one on rollback):

1. ``reembed-gallery`` composes the version's models folder (``server.registry.model_folder``), loads its
   embedder (``[models] embedder``, int8 by default) with ``device.vision.embedder.Embedder``, and gives
   every stored chip an encrypted template under that sha256 (``server.enrollment.reembed``). Templates
   of earlier models are kept, so a rollback embeds only the chips enrolled since.
2. ``build-bundle`` calls ``server.bundles.gallery_bundle.build_gallery_bundle``: it exports the server
   gallery for that sha256 into a private temp folder and builds a bundle signed with the server key into
   ``bundles_root``, ready for ``facegate bundle publish``. In the server process it then points the
   recognition engine at the new models, so enrollment, verify and identify use the promoted embedder
   and its templates.

A liveness head (kind ``liveness``) changes no template: ``reembed-gallery`` says so and returns, and
``build-bundle`` builds the bundle of the current embedder with the head's two entries in its models
folder, so the doors' passive check picks it up on install. The pairs head changes neither the
embeddings nor the doors: both hooks say so in the log and return. Nothing biometric is logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from device.vision.embedder import Embedder
from models.runtime.assets import default_models_dir
from models.runtime.manifest import load_manifest
from server.bundles.gallery_bundle import build_gallery_bundle
from server.config import ServerConfig
from server.crypto import ChipCipher, load_chip_cipher
from server.db.session import Database
from server.enrollment.index import EnrollmentIndex
from server.enrollment.recognition import RecognitionEngine
from server.enrollment.reembed import reembed_gallery
from server.registry import gate
from server.registry.model_folder import embedder_entry_name, models_folder_for
from server.registry.registry import ModelRegistry

if TYPE_CHECKING:
    from server.state import AppState

logger = logging.getLogger(__name__)

REEMBED_HOOK, BUNDLE_HOOK = gate.DEFAULT_HOOKS


@dataclass
class PromotionContext:
    """What the hooks need: the server config and database, the chip key, and (in the server) the engine.

    ``cipher`` None loads the configured key on first use and never creates one: a missing key fails.
    ``outcomes`` collects what the hooks did (counts, the bundle) for the CLI to print.
    """

    config: ServerConfig
    db: Database
    cipher: ChipCipher | None = None
    engine: RecognitionEngine | None = None
    index: EnrollmentIndex | None = None
    progress: bool = False
    outcomes: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def for_state(cls, state: AppState) -> PromotionContext:
        """The context of a running server (its database, key, engine and index)."""
        return cls(state.config, state.db, state.cipher, state.engine, state.index)

    def chip_cipher(self) -> ChipCipher:
        """The chip key (loaded once; a promotion never creates a new key)."""
        if self.cipher is None:
            crypto = self.config.crypto.model_copy(update={"create_key_file": False})
            self.cipher = load_chip_cipher(self.config.model_copy(update={"crypto": crypto}))
        return self.cipher


def _active_models(ctx: PromotionContext, event: gate.PromotionEvent) -> Path | None:
    """The models folder of the now-active embedder and liveness head (one of them the event's version),
    or None (logged) for a kind the doors do not run."""
    if event.active.kind not in ("embedder", "liveness"):
        logger.info("%s of %s (a %s): no gallery or bundle change", event.action, event.active.version,
                    event.active.kind)
        return None
    registry = ModelRegistry(ctx.db)
    embedder = event.active if event.active.kind == "embedder" else registry.current("embedder")
    # The promoted head (a withdrawal leaves none: back to the MiniFASNet scorer).
    liveness = registry.current("liveness")
    if embedder is None and liveness is None:
        return ctx.config.models.dir or default_models_dir()
    return models_folder_for(ctx.config, embedder, liveness)


def reembed_hook(ctx: PromotionContext, event: gate.PromotionEvent) -> None:
    """Hook ``reembed-gallery``: a template under the active embedder for every stored chip."""
    if event.active.kind != "embedder":
        logger.info("%s of %s (a %s): the templates do not change", event.action, event.active.version,
                    event.active.kind)
        return
    folder = _active_models(ctx, event)
    if folder is None:
        return
    entry = load_manifest(folder).get(embedder_entry_name(ctx.config))
    with Embedder.from_entry(folder, entry, ctx.config.models.threads) as embedder:
        report = reembed_gallery(ctx.db, ctx.chip_cipher(), embedder, progress=ctx.progress)
    if ctx.index is not None:
        ctx.index.invalidate()
    ctx.outcomes.update(model_sha256=report.model_sha256, chips=report.chips, reembedded=report.embedded,
                        already_embedded=report.skipped)
    logger.warning("%s %s: %d chips re-embedded, %d already had a template for it", event.action,
                   event.active.version, report.embedded, report.skipped)


def bundle_hook(ctx: PromotionContext, event: gate.PromotionEvent) -> None:
    """Hook ``build-bundle``: export the gallery for the active embedder, build and sign the bundle (with
    the promoted liveness head's entries, when there is one)."""
    folder = _active_models(ctx, event)
    if folder is None:
        return
    summary = build_gallery_bundle(ctx, folder)
    ctx.outcomes["bundle"] = {k: summary[k] for k in ("sequence", "path", "persons", "templates",
                                                       "model_version")}
    logger.warning("%s %s: bundle %d built in %s (%d persons); publish it with `facegate bundle publish`",
                   event.action, event.active.version, summary["sequence"], summary["path"],
                   summary["persons"])
    if ctx.engine is not None:
        ctx.engine.use_models(folder)
        if ctx.index is not None:
            ctx.index.invalidate()


def promotion_hooks(ctx: PromotionContext) -> dict[str, gate.PromotionHook]:
    """The real ``reembed-gallery`` and ``build-bundle`` hooks bound to ``ctx`` (pass them to the gate)."""
    return {
        REEMBED_HOOK: lambda event: reembed_hook(ctx, event),
        BUNDLE_HOOK: lambda event: bundle_hook(ctx, event),
    }
