"""The registry on real SQLite and the promotion gate: refuses a worse model loudly, hooks, rollback."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from server.registry import gate
from server.registry.registry import ModelRegistry, RegistryError, Status
from server.training.data import IdentityLeakError, check_disjoint, pair_identities


def _metrics(tar: float, parity: float = 0.999, disjoint: bool = True) -> dict[str, Any]:
    report = {"pairs": 1200, "auc": 0.99, "eer": 0.05, "tar_at_far": {"0.01": tar + 0.1, "0.001": tar}}
    return {"heldout": {"folds": [9, 10], "identities_disjoint": disjoint}, "float": report, "int8": report,
            "parity": {"mean_cosine": parity, "min_cosine": parity - 0.01}}


@pytest.fixture()
def registry(tmp_path: Path) -> ModelRegistry:
    with ModelRegistry.open(f"sqlite:///{tmp_path / 'server.db'}") as reg:
        yield reg


@pytest.fixture()
def hooks() -> dict[str, gate.PromotionHook]:
    return {}


@pytest.fixture()
def calls(hooks: dict[str, gate.PromotionHook]) -> list[tuple[str, str, str, str | None]]:
    seen: list[tuple[str, str, str, str | None]] = []
    for name in gate.DEFAULT_HOOKS:
        hooks[name] = lambda ev, name=name: seen.append(
            (name, ev.action, ev.active.version, None if ev.previous is None else ev.previous.version))
    return seen


def _register(reg: ModelRegistry, tar: float, **kw: Any) -> str:
    return reg.register("embedder", metrics=_metrics(tar, **kw), artifacts={"int8": "x.tflite"},
                        hyperparams={"alpha": 0.2}, data_hash="d" * 64).version


def test_gate_refuses_a_worse_model_and_records_why(registry: ModelRegistry, calls: list[Any],
                                                     hooks: dict[str, gate.PromotionHook],
                                                     caplog: pytest.LogCaptureFixture) -> None:
    base = _register(registry, 0.80)
    gate.promote(registry, base, hooks=hooks)
    worse = _register(registry, 0.75)
    with caplog.at_level(logging.WARNING), pytest.raises(gate.PromotionRefusedError,
                                                         match="below the current"):
        gate.promote(registry, worse, gate.GateConfig(tolerance=0.02), hooks=hooks)
    assert registry.current().version == base  # nothing changed
    assert registry.get(worse).status == Status.REFUSED
    assert any(e["action"] == "refuse" for e in registry.events(worse))
    assert "refused to promote" in caplog.text  # never silent
    assert [c[0] for c in calls] == ["reembed-gallery", "build-bundle"]  # only the first promotion ran hooks


def test_gate_accepts_within_tolerance_then_rollback_restores(registry: ModelRegistry,
                                                              calls: list[Any],
                                                              hooks: dict[str, gate.PromotionHook]) -> None:
    v1 = _register(registry, 0.80)
    gate.promote(registry, v1, hooks=hooks)
    v2 = _register(registry, 0.795)
    decision = gate.promote(registry, v2, gate.GateConfig(tolerance=0.01), hooks=hooks)
    assert decision.passed and decision.current == v1
    assert registry.current().version == v2 and registry.get(v1).status == Status.RETIRED
    withdrawn, restored = gate.rollback(registry, hooks=hooks)
    assert (withdrawn.version, restored.version) == (v2, v1)
    assert registry.current().version == v1 and registry.get(v2).status == Status.ROLLED_BACK
    assert calls[-1] == ("build-bundle", "rollback", v1, v2)
    with pytest.raises(RegistryError, match="replaced nothing"):
        gate.rollback(registry, hooks=hooks)


@pytest.mark.parametrize(("kwargs", "reason"), [
    ({"parity": 0.95}, "parity"),
    ({"disjoint": False}, "disjoint"),
])
def test_gate_refuses_bad_parity_or_unchecked_identities(registry: ModelRegistry, calls: list[Any],
                                                         hooks: dict[str, gate.PromotionHook],
                                                         kwargs: dict[str, Any], reason: str) -> None:
    version = _register(registry, 0.9, **kwargs)
    with pytest.raises(gate.PromotionRefusedError, match=reason):
        gate.promote(registry, version, hooks=hooks)
    assert registry.current() is None and calls == []


def test_failing_hook_undoes_the_promotion(registry: ModelRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    hooks: dict[str, gate.PromotionHook] = {"reembed-gallery": lambda ev: None,
                                            "build-bundle": lambda ev: None}
    v1 = _register(registry, 0.8)
    gate.promote(registry, v1, hooks=hooks)

    def broken(event: gate.PromotionEvent) -> None:
        raise OSError("bundle store is full")

    hooks["build-bundle"] = broken
    v2 = _register(registry, 0.85)
    with pytest.raises(gate.PromotionHookError, match="bundle store is full"):
        gate.promote(registry, v2, hooks=hooks)
    assert registry.current().version == v1
    assert registry.get(v2).status == Status.CANDIDATE  # may be retried once the hook is fixed
    assert [e["action"] for e in registry.events(v2)][-1] == "undo-promote"


def test_without_server_context_a_promotion_fails_and_is_undone(registry: ModelRegistry,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    hooks = gate.default_hooks()  # what a process gets before it passes the real hooks
    first = _register(registry, 0.8)
    with pytest.raises(gate.PromotionHookError, match=r"no server context.*--config"):
        gate.promote(registry, first, hooks=hooks)
    assert registry.current() is None  # even a first promotion is taken back
    assert registry.get(first).status == Status.CANDIDATE


def test_registry_lineage_and_unknown_versions(registry: ModelRegistry) -> None:
    v1 = _register(registry, 0.8)
    child = registry.register("embedder", metrics={}, artifacts={}, hyperparams={"lr": 1e-3}, parent=v1)
    assert child.parent_version == v1 and child.version == "embedder-v2"
    assert [v.version for v in registry.versions("embedder")] == [v1, "embedder-v2"]
    with pytest.raises(RegistryError, match="no model version"):
        registry.get("embedder-v99")
    with pytest.raises(RegistryError, match="no model version"):
        registry.register("embedder", metrics={}, artifacts={}, hyperparams={}, parent="nope")


def test_identity_guard_raises_on_overlap(tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("fold,path_a,path_b,same\n9,ann/1.jpg,ann/2.jpg,1\n10,bob/1.jpg,cat/1.jpg,0\n"
                     "1,dan/1.jpg,dan/2.jpg,1\n")
    held_out = pair_identities(pairs, (9, 10))
    assert held_out == {"ann", "bob", "cat"}
    check_disjoint({"dan", "eve"}, held_out)
    with pytest.raises(IdentityLeakError, match=r"1 training identities.*bob"):
        check_disjoint({"dan", "bob"}, held_out)
