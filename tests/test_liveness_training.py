"""The fine-tuned liveness head (issue 20): MiniFASNet with a features output, `facegate train liveness` on
NUAA and Replay-Attack (train+devel), the liveness gate, the composed models folder and signed bundle,
and the door's passive check scoring with the head the bundle ships.

Real parts throughout: the built MiniFASNet and BlazeFace, ../shared's labelled frames, a TFLite head
exported by TensorFlow, a SQLite registry and the server's real promotion hooks."""

from __future__ import annotations

import csv
import datetime as dt
import itertools
import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from core.files import sha256_file
from device.config import DetectorConfig, LivenessConfig
from device.liveness.fusion import build_liveness, refresh_trained_head
from device.liveness.passive import PassiveModelError, logit
from device.liveness.trained import FEATURES_ENTRY, HEAD_ENTRY, trained_head_files
from facegate.cli import main
from models.face.detector import BlazeFaceDetector
from models.face.image import decode_image
from models.runtime.interpreter import TFLiteModel
from models.runtime.manifest import load_manifest, save_manifest
from server.app import create_app
from server.bundles.builder import load_bundle
from server.bundles.signing import generate_key
from server.config import load_server_config
from server.crypto import load_chip_cipher
from server.enrollment.recognition import RecognitionEngine
from server.evaluation.liveness import detector_path, load_labels, run_liveness_eval, trained_scores
from server.registry import gate
from server.registry.model_folder import ModelFolderError, liveness_artifacts
from server.registry.promotion import PromotionContext, promotion_hooks
from server.registry.registry import ModelRegistry, ModelVersion, Status
from server.training.cli import cli as train_cli
from server.training.liveness import FEATURES_FILE, HEAD_FILE, mapped_head
from tests.server_support import make_config, state_of

SETS = ("liveness-nuaa", "replay-attack")
PROTOCOLS = ("leave-one-dataset-out", "leave-subjects-out")
DOOR = LivenessConfig().passive
_numbers = itertools.count(1)


@pytest.fixture(scope="module")
def minifasnet_models(built_models: Path) -> Path:
    if not load_manifest(built_models).has("minifasnet-2.7"):
        pytest.skip("the built models have no MiniFASNet (../shared/models/minifasnet absent)")
    return built_models


@pytest.fixture(scope="module")
def report(shared_dir: Path, minifasnet_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real training run on both shared sets, through the CLI (its JSON summary is checked)."""
    out = tmp_path_factory.mktemp("liveness") / "report"
    labels = [shared_dir / "data" / name / "labels.csv" for name in SETS]
    args = [a for path in labels for a in ("--labels", str(path))]
    result = CliRunner().invoke(train_cli, ["liveness", *args, "--report", str(out), "--models-dir",
                                            str(minifasnet_models), "--no-progress"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["sets"] == list(SETS)
    assert set(summary["heldout"]) == set(PROTOCOLS)
    return out


def _metrics(report: Path) -> dict[str, Any]:
    metrics: dict[str, Any] = json.loads((report / "metrics.json").read_text(encoding="utf-8"))
    return metrics


def _subset(shared_dir: Path, tmp_path: Path, per_kind: int = 4) -> Path:
    """A labels CSV of a few Replay-Attack frames per kind (absolute paths), for quick door-side checks."""
    root = shared_dir / "data" / "replay-attack"
    with open(root / "kinds.csv", newline="", encoding="utf-8") as handle:
        kinds = {row["path"]: row["kind"] for row in csv.DictReader(handle)}
    taken: dict[str, int] = {}
    rows = []
    for row in load_labels(root / "labels.csv"):
        kind = kinds[row.path]
        if taken.get(kind, 0) < per_kind:
            taken[kind] = taken.get(kind, 0) + 1
            label = "genuine" if row.genuine else "attack"
            rows.append([str(root / row.path), label, row.subject, row.session])
    path = tmp_path / "subset" / "labels.csv"
    path.parent.mkdir()
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "subject", "session"])
        writer.writerows(rows)
    return path


def test_features_model_keeps_the_logits_and_adds_the_pooled_features(report: Path,
                                                                      minifasnet_models: Path) -> None:
    manifest = load_manifest(minifasnet_models)
    original = minifasnet_models / manifest.get("minifasnet-2.7").file
    x = np.random.default_rng(0).uniform(0, 255, (1, 80, 80, 3)).astype(np.float32)
    with TFLiteModel(original) as base, TFLiteModel(report / "export" / FEATURES_FILE) as features:
        logits, pooled = features.run_all(x)
        np.testing.assert_array_equal(logits, base.run(x))
        assert pooled.shape == (1, 1, 1, 512) and np.isfinite(pooled).all()


def test_report_holds_held_out_figures_of_the_head_and_the_shipped_scorer(report: Path) -> None:
    metrics = _metrics(report)
    heldout = metrics["heldout"]
    assert heldout["trained_on"] == list(SETS) and heldout["baseline"] == "head"
    for protocol in PROTOCOLS:
        for scorer in ("trained", "head"):
            for name in SETS:
                rates = heldout["protocols"][protocol][scorer][name]
                assert 0.0 <= rates["apcer"] <= 1.0 and 0.0 <= rates["bpcer"] <= 1.0
                assert rates["acer"] == pytest.approx((rates["apcer"] + rates["bpcer"]) / 2, abs=1e-6)
    kinds = heldout["protocols"]["leave-subjects-out"]["trained"]["replay-attack"]["apcer_by_kind"]
    assert set(kinds) == {"print", "screen"}
    assert metrics["parity"]["max_abs_probability"] < 1e-4
    assert metrics["feature_width"] == 512 and len(metrics["data_hash"]) == 64


def test_mapped_head_puts_the_fitted_operating_point_on_the_doors() -> None:
    head = (0.5, -1.0, 0.25)
    threshold, band = 0.8, 2.0
    weights, bias = mapped_head(head, threshold, band, DOOR.threshold, DOOR.uncertain_band)
    # features whose fitted logit is exactly at the fitted threshold, then at the band's lower edge
    for fitted_logit, door_logit in ((logit(threshold), logit(DOOR.threshold)),
                                     (logit(threshold) - band, logit(DOOR.threshold) - DOOR.uncertain_band)):
        x = np.array([(fitted_logit - head[-1]) / head[0], 0.0])
        assert float(x @ weights + bias) == pytest.approx(door_logit)


def _register(registry: ModelRegistry, report: Path) -> ModelVersion:
    return registry.register("liveness", metrics=_metrics(report), artifacts=liveness_artifacts(report),
                             hyperparams={})


def test_the_gate_refuses_a_head_that_loses_on_a_held_out_dataset(report: Path, tmp_path: Path) -> None:
    """Measured, not assumed: on these two sets the head wins on new people and loses on a new camera."""
    metrics = _metrics(report)
    lodo = metrics["heldout"]["protocols"]["leave-one-dataset-out"]
    loses = any(lodo["trained"][n]["acer"] > lodo["head"][n]["acer"] + 0.01 for n in SETS)
    with ModelRegistry.open(f"sqlite:///{tmp_path / 'registry.db'}") as registry:
        version = _register(registry, report)
        decision = gate.evaluate_gate(version, None, gate.GateConfig())
        assert decision.passed is (not loses and not decision.reasons)
        if loses:
            assert any(r.startswith("leave-one-dataset-out") for r in decision.reasons)
            with pytest.raises(gate.PromotionRefusedError):
                gate.promote(registry, version.version, gate.GateConfig(), hooks={})
            assert registry.get(version.version).status == Status.REFUSED.value
        assert decision.liveness is not None and set(decision.liveness["leave-subjects-out"]) == set(SETS)


def _synthetic_version(cand: dict[str, tuple[float, float]], base: dict[str, tuple[float, float]],
                       parity: float = 1e-7) -> ModelVersion:
    def block(rates: dict[str, tuple[float, float]]) -> dict[str, Any]:
        return {n: {"acer": a, "bpcer": b, "apcer": 2 * a - b} for n, (a, b) in rates.items()}

    protocols = {p: {"trained": block(cand), "head": block(base)} for p in PROTOCOLS}
    metrics = {"heldout": {"trained_on": list(cand), "candidate": "trained", "baseline": "head",
                           "budget": 0.05, "protocols": protocols},
               "parity": {"max_abs_probability": parity}}
    number = next(_numbers)
    return ModelVersion(f"liveness-v{number}", "liveness", "candidate", None, None, "", {}, metrics, {}, "",
                        dt.datetime.now(dt.UTC), None)


def test_liveness_gate_rules() -> None:
    base = {"a": (0.10, 0.05), "b": (0.08, 0.04)}
    better = _synthetic_version({"a": (0.05, 0.05), "b": (0.04, 0.03)}, base)
    assert gate.evaluate_gate(better, None, gate.GateConfig()).passed
    one_set_worse = _synthetic_version({"a": (0.01, 0.02), "b": (0.10, 0.04)}, base)
    reasons = gate.evaluate_gate(one_set_worse, None, gate.GateConfig()).reasons
    assert any("on b is worse" in r for r in reasons)
    refuses_users = _synthetic_version({"a": (0.06, 0.12), "b": (0.04, 0.03)}, base)
    assert any("refuses more genuine users" in r
               for r in gate.evaluate_gate(refuses_users, None, gate.GateConfig()).reasons)
    bad_export = _synthetic_version({"a": (0.05, 0.05), "b": (0.04, 0.03)}, base, parity=0.01)
    reasons = gate.evaluate_gate(bad_export, None, gate.GateConfig()).reasons
    assert any("exported head differs" in r for r in reasons)
    worse_than_current = _synthetic_version({"a": (0.07, 0.05), "b": (0.06, 0.03)}, base)
    reasons = gate.evaluate_gate(worse_than_current, better, gate.GateConfig()).reasons
    assert any("worse than the current head" in r for r in reasons)
    subjects_only = gate.GateConfig(liveness_protocols=("leave-subjects-out",))
    decision = gate.evaluate_gate(better, None, subjects_only)
    assert decision.passed and "unsafe" in (decision.liveness or {})


@pytest.fixture()
def server(tmp_path: Path, minifasnet_models: Path) -> Iterator[TestClient]:
    config = make_config(tmp_path, models={"dir": str(minifasnet_models)})
    generate_key(config.signing_key_path)
    with TestClient(create_app(config, engine=RecognitionEngine.from_config(config),
                               start_mqtt=False)) as client:
        yield client


def test_a_promoted_head_reaches_the_signed_bundle_and_the_door_scores_with_it(
        report: Path, server: TestClient, shared_dir: Path, minifasnet_models: Path, tmp_path: Path) -> None:
    state = state_of(server)
    context = PromotionContext(state.config, state.db, state.cipher)
    registry = ModelRegistry(state.db)
    version = _register(registry, report)
    # Gated on new people only (the site-camera case): allowed, and recorded as unsafe in the decision.
    cfg = gate.GateConfig(liveness_protocols=("leave-subjects-out",))
    decision = gate.promote(registry, version.version, cfg, hooks=promotion_hooks(context))
    assert decision.passed and decision.liveness is not None and "unsafe" in decision.liveness
    assert registry.current("liveness") is not None
    bundle = load_bundle(Path(context.outcomes["bundle"]["path"]))
    models = bundle.path / "models"
    manifest = load_manifest(models)
    assert manifest.get(HEAD_ENTRY).role == manifest.get(FEATURES_ENTRY).role == "liveness"
    assert manifest.get(HEAD_ENTRY).extra["registry_version"] == version.version
    assert {e.name for e in manifest.models} >= {"minifasnet-2.7", "minifasnet-4.0", "embedder-int8"}

    # The door built on the bundle's models scores with the head, exactly as the evaluation does.
    labels = _subset(shared_dir, tmp_path)
    rows = load_labels(labels)
    files = trained_head_files(models)
    assert files is not None
    expected, name = trained_scores(rows, labels.parent, models, files, progress=False)
    assert name == "trained-head" and not np.isnan(expected).any()
    with build_liveness(LivenessConfig(), models) as engine:
        assert engine.passive is not None and engine.passive.trained is not None
        with BlazeFaceDetector(detector_path(models, "short"), "short", DetectorConfig()) as detector:
            for row, want in zip(rows[:4], expected[:4], strict=True):
                rgb = decode_image(Path(row.path).read_bytes())
                face = max(detector.detect(rgb), key=lambda d: d.width * d.height)
                assert engine.passive.score(rgb, face) == pytest.approx(want, abs=1e-5)
    result = run_liveness_eval(labels, models, threshold=DOOR.threshold, progress=False)
    assert result["details"]["score"] == "trained-head" and result["threshold_source"] == "fixed"


def test_a_running_door_swaps_to_the_bundles_head_and_back(report: Path, minifasnet_models: Path,
                                                           tmp_path: Path) -> None:
    folder = tmp_path / "models"
    shutil.copytree(minifasnet_models, folder)
    for file, name in ((FEATURES_FILE, FEATURES_ENTRY), (HEAD_FILE, HEAD_ENTRY)):
        shutil.copy2(report / "export" / file, folder / f"{name}.tflite")
    manifest = load_manifest(folder)
    base = manifest.get("minifasnet-2.7")
    extra = [base.model_copy(update={"name": name, "file": f"{name}.tflite",
                                     "sha256": sha256_file(folder / f"{name}.tflite"),
                                     "extra": {"scale": "2.7"}}) for name in (FEATURES_ENTRY, HEAD_ENTRY)]
    save_manifest(folder, manifest.model_copy(update={"models": [*manifest.models, *extra]}))
    with build_liveness(LivenessConfig(), minifasnet_models) as engine:
        assert engine.passive is not None and engine.passive.trained is None
        assert refresh_trained_head(engine, LivenessConfig(), folder)
        assert engine.passive.trained is not None
        assert refresh_trained_head(engine, LivenessConfig(), minifasnet_models)  # a bundle without a head
        assert engine.passive.trained is None
        off = LivenessConfig.model_validate({"passive": {"trained_head": "off"}})
        assert not refresh_trained_head(engine, off, folder)
        assert engine.passive.trained is None

    # Damage: one entry without the other, or a changed file, is an error, never a silent fallback.
    only_head = manifest.model_copy(update={"models": [*manifest.models, extra[1]]})
    save_manifest(folder, only_head)
    with pytest.raises(PassiveModelError, match="only one of"):
        trained_head_files(folder)
    save_manifest(folder, manifest.model_copy(update={"models": [*manifest.models, *extra]}))
    (folder / f"{HEAD_ENTRY}.tflite").write_bytes(b"not a model")
    with pytest.raises(PassiveModelError, match="unusable"):
        trained_head_files(folder)


def test_cli_register_refuse_then_promote_for_the_site_cameras(report: Path, minifasnet_models: Path,
                                                               tmp_path: Path) -> None:
    toml = tmp_path / "server.toml"
    toml.write_text(f'data_dir = "{tmp_path / "server"}"\n[models]\ndir = "{minifasnet_models}"\n'
                    "[mqtt]\nenabled = false\n")
    config = load_server_config(toml)
    generate_key(config.signing_key_path)
    load_chip_cipher(config)
    db = ["--config", str(toml)]
    registered = CliRunner().invoke(main, ["models", "register", "--kind", "liveness", str(report), *db])
    assert registered.exit_code == 0, registered.output
    view = json.loads(registered.stdout)
    assert view["version"] == "liveness-v1" and set(view["liveness"]) == set(PROTOCOLS)
    lodo = _metrics(report)["heldout"]["protocols"]["leave-one-dataset-out"]
    if any(lodo["trained"][n]["acer"] > lodo["head"][n]["acer"] + 0.01 for n in SETS):
        refused = CliRunner().invoke(main, ["models", "promote", "liveness-v1", *db])
        assert refused.exit_code == 1 and "leave-one-dataset-out" in refused.output
        assert json.loads(refused.stdout.splitlines()[0])["promoted"] is False
    promoted = CliRunner().invoke(main, ["models", "promote", "liveness-v1", "--liveness-protocol",
                                         "leave-subjects-out", *db])
    assert promoted.exit_code == 0, promoted.output
    out = json.loads(promoted.stdout)
    assert out["promoted"] is True and "unsafe" in out["liveness"] and out["bundle"]["sequence"] == 1
    models = Path(out["bundle"]["path"]) / "models"
    assert trained_head_files(models) is not None
    listing = json.loads(CliRunner().invoke(main, ["models", "list", "--kind", "liveness", *db]).stdout)
    assert [(m["version"], m["status"]) for m in listing["models"]] == [("liveness-v1", "promoted")]
    # Rolling back the first head withdraws it: the next bundle ships the MiniFASNet scorer alone.
    back = CliRunner().invoke(main, ["models", "rollback", "--kind", "liveness", *db])
    assert back.exit_code == 0, back.output
    withdrawn = json.loads(back.stdout)
    assert (withdrawn["withdrawn"], withdrawn["restored"]) == ("liveness-v1", None)
    assert withdrawn["bundle"]["sequence"] == 2
    assert trained_head_files(Path(withdrawn["bundle"]["path"]) / "models") is None
    listing = json.loads(CliRunner().invoke(main, ["models", "list", "--kind", "liveness", *db]).stdout)
    assert [(m["version"], m["status"]) for m in listing["models"]] == [("liveness-v1", "rolled_back")]


def test_register_refuses_a_report_without_the_exported_files(tmp_path: Path) -> None:
    with pytest.raises(ModelFolderError, match="not a liveness report"):
        liveness_artifacts(tmp_path)


def test_train_refuses_labels_without_both_classes(tmp_path: Path, minifasnet_models: Path) -> None:
    labels = tmp_path / "only-genuine" / "labels.csv"
    labels.parent.mkdir()
    labels.write_text("path,label,subject,session\na.jpg,genuine,1,1\n", encoding="utf-8")
    result = CliRunner().invoke(train_cli, ["liveness", "--labels", str(labels), "--report",
                                            str(tmp_path / "r"), "--models-dir", str(minifasnet_models),
                                            "--no-progress"])
    assert result.exit_code != 0 and "both genuine and attack" in result.output
    assert math.isfinite(DOOR.threshold)
