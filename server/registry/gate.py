"""The evaluation gate and promotion: refuse a worse model, loudly; run the promotion hooks.

A candidate embedder is promoted only when

1. its figures come from held-out pairs whose identities were checked disjoint from its training
   identities (recorded by the trainer, folds as configured);
2. its int8 export matches its float model (mean cosine >= ``min_parity_cosine``);
3. its TAR at FAR = 1e-3 is not worse than the current model's by more than ``tolerance``.

A candidate **liveness head** (``facegate train liveness``) is promoted only when, on every protocol of
``liveness_protocols`` (default: leave one dataset out *and* leave subjects out) and every set it was
trained on, its held-out ACER is not worse than the shipped scorer's (MiniFASNet with the calibrated head,
measured on the same frames in the same run) by more than ``tolerance``, its held-out BPCER stays within
the budget (or the shipped scorer's BPCER), its mean ACER beats the shipped scorer's, and its exported
TFLite matches the fitted head; a promoted head is replaced only by one measured on the same sets and
no worse by mean held-out ACER. Gating on leave-subjects-out alone is allowed for a head trained on the
site's own cameras; it is logged UNSAFE and recorded in the gate's figures.

Any failed check refuses the promotion: the refusal and its reasons are written to the registry and
logged as a warning, and ``PromotionRefusedError`` is raised. After a promotion (or a rollback) every
configured hook runs: by default "reembed-gallery" and "build-bundle". They need the server's database,
chip key, models and signing key, so the caller that holds that context passes them in
(``hooks=server.registry.promotion.promotion_hooks(ctx)``: the ``facegate models promote|rollback`` CLI and
the server app's ``AppState.promotion_hooks``). Without them the defaults fail, loudly: a promotion never
"succeeds" without its gallery and bundle. A failing hook undoes the promotion (the previous model, if any,
is promoted again and the candidate goes back to ``candidate``) and raises ``PromotionHookError``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from server.registry.registry import ModelRegistry, ModelVersion, RegistryError

logger = logging.getLogger(__name__)

FAR_KEY = "0.001"  # the gate's operating point: TAR at FAR = 1e-3
# A liveness head must beat the shipped scorer on new cameras (datasets) and on new people, both held out.
LIVENESS_PROTOCOLS: tuple[Literal["leave-one-dataset-out", "leave-subjects-out"], ...] = (
    "leave-one-dataset-out", "leave-subjects-out")
DEFAULT_HOOKS = ("reembed-gallery", "build-bundle")


class PromotionRefusedError(Exception):
    """The gate refused a candidate; ``decision`` says why."""

    def __init__(self, decision: GateDecision) -> None:
        super().__init__(f"promotion of {decision.candidate} refused: " + "; ".join(decision.reasons))
        self.decision = decision


class PromotionHookError(Exception):
    """A promotion hook failed; the promotion was undone."""


class GateConfig(BaseModel):
    """Settings of the evaluation gate."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tolerance: float = Field(0.01, ge=0.0, le=1.0,
                             description="Allowed TAR@FAR=1e-3 drop vs the current model.")
    metric: Literal["int8", "float"] = Field("int8", description="Which candidate figures are compared "
                                             "(int8: what the doors run).")
    min_parity_cosine: float = Field(0.99, ge=0.0, le=1.0, description="Min mean cosine int8 vs float.")
    eval_folds: tuple[int, ...] = Field((9, 10), min_length=1, description="Held-out folds of pairs.csv.")
    liveness_protocols: tuple[Literal["leave-one-dataset-out", "leave-subjects-out"], ...] = Field(
        LIVENESS_PROTOCOLS, min_length=1,
        description="Held-out protocols on which a liveness head must beat the shipped scorer.")
    max_liveness_parity: float = Field(1e-4, ge=0.0, le=1.0,
                                       description="Max |TFLite - fitted| probability of a liveness head.")
    hooks: tuple[str, ...] = Field(DEFAULT_HOOKS, description="Hooks run after promote/rollback, in order.")


@dataclass(frozen=True, slots=True)
class GateDecision:
    """The gate's verdict with the figures it compared."""

    candidate: str
    passed: bool
    reasons: list[str]
    candidate_tar: float | None
    current: str | None
    current_tar: float | None
    parity_mean_cosine: float | None
    # Liveness heads: per protocol and set, the candidate's and the shipped scorer's held-out ACER/BPCER.
    liveness: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        out = {"candidate": self.candidate, "passed": self.passed, "reasons": self.reasons,
               "candidate_tar": self.candidate_tar, "current": self.current, "current_tar": self.current_tar,
               "parity_mean_cosine": self.parity_mean_cosine}
        if self.liveness is not None:
            out["liveness"] = self.liveness
        return out


def metric_tar(version: ModelVersion, metric: str) -> float | None:
    """TAR@FAR=1e-3 of a version's ``metric`` figures ("int8"/"float", falling back to "float")."""
    for key in (metric, "float"):
        block = version.metrics.get(key)
        if isinstance(block, dict) and FAR_KEY in block.get("tar_at_far", {}):
            return float(block["tar_at_far"][FAR_KEY])
    return None


def _rates(by_scorer: dict[str, Any], scorer: str, name: str) -> tuple[float, float] | None:
    rates = by_scorer.get(scorer, {}).get(name) if isinstance(by_scorer, dict) else None
    if not isinstance(rates, dict) or "acer" not in rates or "bpcer" not in rates:
        return None
    return float(rates["acer"]), float(rates["bpcer"])


def _mean_acer(version: ModelVersion, protocol: str) -> float | None:
    heldout = version.metrics.get("heldout", {})
    sets, name = list(heldout.get("trained_on", ())), str(heldout.get("candidate", ""))
    by_scorer = heldout.get("protocols", {}).get(protocol, {})
    rates = [_rates(by_scorer, name, s) for s in sets]
    if not sets or any(r is None for r in rates):
        return None
    return sum(r[0] for r in rates if r is not None) / len(sets)


def _against_current(candidate: ModelVersion, current: ModelVersion, cfg: GateConfig) -> list[str]:
    """A promoted head is replaced only by one no worse on the same sets (mean held-out ACER)."""
    same_sets = (candidate.metrics.get("heldout", {}).get("trained_on")
                 == current.metrics.get("heldout", {}).get("trained_on"))
    if not same_sets:
        return [f"the current head {current.version} was measured on other sets: measure both on the "
                "same sets before replacing it"]
    out = []
    for protocol in cfg.liveness_protocols:
        cand, cur = _mean_acer(candidate, protocol), _mean_acer(current, protocol)
        if cand is not None and cur is not None and cand > cur + cfg.tolerance:
            out.append(f"{protocol}: mean ACER {cand:.4f} is worse than the current head {current.version}'s "
                       f"{cur:.4f} by more than the tolerance {cfg.tolerance}")
    return out


def evaluate_liveness_gate(candidate: ModelVersion, current: ModelVersion | None,
                           cfg: GateConfig) -> GateDecision:
    """The liveness gate (module doc); never raises, returns the verdict with the compared figures."""
    reasons: list[str] = []
    heldout = candidate.metrics.get("heldout", {})
    sets = list(heldout.get("trained_on", ()))
    protocols = heldout.get("protocols", {})
    cand_name, base_name = heldout.get("candidate"), heldout.get("baseline")
    budget = float(heldout.get("budget", 0.05))
    figures: dict[str, Any] = {"protocols": list(cfg.liveness_protocols), "budget": budget}
    if not sets or not cand_name or not base_name:
        reasons.append("no held-out liveness figures (train with `facegate train liveness`)")
    for protocol in cfg.liveness_protocols if sets else ():
        if protocol == "leave-one-dataset-out" and len(sets) < 2:
            reasons.append("leave-one-dataset-out needs at least two training sets")
            continue
        by_scorer = protocols.get(protocol, {})
        cand_total = base_total = 0.0
        figures[protocol] = {}
        for name in sets:
            cand, base = _rates(by_scorer, str(cand_name), name), _rates(by_scorer, str(base_name), name)
            if cand is None or base is None:
                reasons.append(f"{protocol}: no figures for {name}")
                continue
            figures[protocol][name] = {"candidate_acer": cand[0], "candidate_bpcer": cand[1],
                                       "shipped_acer": base[0], "shipped_bpcer": base[1]}
            cand_total, base_total = cand_total + cand[0], base_total + base[0]
            if cand[0] > base[0] + cfg.tolerance:
                reasons.append(f"{protocol}: ACER {cand[0]:.4f} on {name} is worse than the shipped "
                               f"scorer's {base[0]:.4f} by more than the tolerance {cfg.tolerance}")
            if cand[1] > max(budget, base[1]) + cfg.tolerance:
                reasons.append(f"{protocol}: BPCER {cand[1]:.4f} on {name} refuses more genuine users than "
                               f"the budget {budget} and the shipped scorer's {base[1]:.4f}")
        if figures[protocol] and cand_total >= base_total:
            reasons.append(f"{protocol}: mean ACER {cand_total / len(sets):.4f} does not beat the shipped "
                           f"scorer's {base_total / len(sets):.4f}")
    if current is not None and current.version != candidate.version:
        reasons.extend(_against_current(candidate, current, cfg))
    parity = candidate.metrics.get("parity", {}).get("max_abs_probability")
    if parity is None:
        reasons.append("no TFLite-vs-fitted parity figure for the head")
    elif float(parity) > cfg.max_liveness_parity:
        reasons.append(f"the exported head differs from the fitted one by {float(parity):.2e} "
                       f"(> {cfg.max_liveness_parity})")
    if "leave-one-dataset-out" not in cfg.liveness_protocols:
        figures["unsafe"] = ("not checked on a held-out dataset: trusted only for the cameras of "
                             + ", ".join(sets))
        logger.warning("UNSAFE liveness gate for %s: %s", candidate.version, figures["unsafe"])
    return GateDecision(candidate.version, not reasons, reasons, None,
                        None if current is None else current.version, None, None, figures)


def evaluate_gate(candidate: ModelVersion, current: ModelVersion | None, cfg: GateConfig) -> GateDecision:
    """Apply the three checks of the module doc (the liveness gate for a liveness head); never raises."""
    if candidate.kind == "liveness":
        return evaluate_liveness_gate(candidate, current, cfg)
    reasons: list[str] = []
    heldout = candidate.metrics.get("heldout", {})
    external = heldout.get("trained_on") == "external"  # a pretrained model: no facegate training ids
    if heldout.get("identities_disjoint") is not True and not external:
        reasons.append("no record that the held-out identities were checked disjoint from training")
    elif tuple(heldout.get("folds", ())) != tuple(cfg.eval_folds):
        reasons.append(f"evaluated on folds {heldout.get('folds')}, the gate needs {list(cfg.eval_folds)}")
    parity = candidate.metrics.get("parity", {}).get("mean_cosine")
    if candidate.kind == "embedder":
        if parity is None:
            reasons.append("no int8-vs-float parity figure (export the int8 model first)")
        elif float(parity) < cfg.min_parity_cosine:
            reasons.append(f"int8 parity mean cosine {float(parity):.4f} < {cfg.min_parity_cosine}")
    cand_tar = metric_tar(candidate, cfg.metric)
    cur_tar = None if current is None else metric_tar(current, cfg.metric)
    if cand_tar is None:
        reasons.append(f"no TAR@FAR={FAR_KEY} figure for the candidate")
    elif current is not None and current.version != candidate.version:
        if cur_tar is None:
            reasons.append(f"the current model {current.version} has no TAR@FAR={FAR_KEY} to compare with")
        elif cand_tar < cur_tar - cfg.tolerance:
            reasons.append(f"TAR@FAR={FAR_KEY} {cand_tar:.4f} is below the current {current.version}'s "
                           f"{cur_tar:.4f} by more than the tolerance {cfg.tolerance}")
    return GateDecision(candidate.version, not reasons, reasons, cand_tar,
                        None if current is None else current.version, cur_tar,
                        None if parity is None else float(parity))


@dataclass(frozen=True, slots=True)
class PromotionEvent:
    """What a hook is told: the action, the now-active version, and the one it replaced."""

    action: Literal["promote", "rollback", "withdraw"]
    active: ModelVersion
    previous: ModelVersion | None
    extra: dict[str, Any] = field(default_factory=dict)


PromotionHook = Callable[[PromotionEvent], None]


class HookContextMissingError(Exception):
    """A default hook ran: nobody installed the real one with the server context."""


def needs_context(name: str) -> PromotionHook:
    """The default for hook ``name``: refuse, because only the server context can do the work."""
    def refuse(event: PromotionEvent) -> None:
        raise HookContextMissingError(
            f"no server context to {event.action} {event.active.version}: hook {name!r} needs the server "
            "database, chip key, models and signing key; run `facegate models promote|rollback --config "
            "<server.toml>` (or pass hooks=server.registry.promotion.promotion_hooks(ctx))")

    return refuse


def default_hooks() -> dict[str, PromotionHook]:
    """The hooks before any context is installed: each one fails the promotion."""
    return {name: needs_context(name) for name in DEFAULT_HOOKS}


def run_hooks(event: PromotionEvent, names: tuple[str, ...], hooks: Mapping[str, PromotionHook]) -> None:
    """Run the named hooks in order; raise PromotionHookError on the first failure."""
    for name in names:
        hook = hooks.get(name)
        if hook is None:
            raise PromotionHookError(f"no hook called {name!r} (known: {', '.join(sorted(hooks))})")
        try:
            hook(event)
        except Exception as exc:  # a hook is foreign code: report which one failed
            raise PromotionHookError(f"hook {name!r} failed for {event.active.version}: {exc}") from exc


def promote(registry: ModelRegistry, version: str, cfg: GateConfig | None = None,
            actor: str = "cli", hooks: Mapping[str, PromotionHook] | None = None) -> GateDecision:
    """Gate ``version`` against the current model; promote it and run the hooks, or refuse loudly.

    ``hooks`` maps hook names to callables (``promotion.promotion_hooks(ctx)``); without them the
    refusing defaults run, so a promotion without the server context is undone."""
    cfg = cfg or GateConfig()
    hooks = default_hooks() if hooks is None else hooks
    candidate = registry.get(version)
    current = registry.current(candidate.kind)
    decision = evaluate_gate(candidate, current, cfg)
    if not decision.passed:
        registry.record_refusal(version, decision.reasons, actor)
        raise PromotionRefusedError(decision)
    replaced = registry.mark_promoted(version, actor, gate=decision.as_dict())
    try:
        run_hooks(PromotionEvent("promote", registry.get(version), replaced), cfg.hooks, hooks)
    except PromotionHookError as exc:
        registry.undo_promotion(version, None if replaced is None else replaced.version, actor, str(exc))
        logger.error("promotion of %s undone: a hook failed", version)
        raise
    return decision


def rollback(registry: ModelRegistry, kind: str = "embedder", cfg: GateConfig | None = None,
             actor: str = "cli", hooks: Mapping[str, PromotionHook] | None = None,
             ) -> tuple[ModelVersion, ModelVersion | None]:
    """Restore the previous promoted version and run the hooks for it (``hooks`` as for ``promote``).

    A liveness head that replaced nothing is withdrawn instead (restored None): the doors go back to the
    shipped MiniFASNet scorer with the next bundle. An embedder always needs one to restore."""
    cfg = cfg or GateConfig()
    hooks = default_hooks() if hooks is None else hooks
    current = registry.current(kind)
    if kind == "liveness" and current is not None and current.replaces_version is None:
        withdrawn = registry.withdraw(kind, actor)
        try:
            run_hooks(PromotionEvent("withdraw", withdrawn, None), cfg.hooks, hooks)
        except PromotionHookError as exc:
            raise PromotionHookError(f"withdrew {withdrawn.version} but {exc}") from exc
        return withdrawn, None
    withdrawn, restored = registry.rollback(kind, actor)
    try:
        run_hooks(PromotionEvent("rollback", restored, withdrawn), cfg.hooks, hooks)
    except PromotionHookError as exc:
        raise PromotionHookError(f"rolled back to {restored.version} but {exc}") from exc
    return withdrawn, restored


__all__ = ["GateConfig", "GateDecision", "HookContextMissingError", "PromotionEvent", "PromotionHookError",
           "PromotionRefusedError", "RegistryError", "default_hooks", "evaluate_gate", "promote", "rollback",
           "run_hooks"]
