"""Registry CLI (list/register/promote/rollback on real SQLite), the data guard in the workflow, and the
Zeiler & Fergus grid on a tiny model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from facegate.cli import main
from server.bundles.signing import generate_key
from server.config import load_server_config
from server.crypto import load_chip_cipher
from server.training.data import IdentityLeakError, load_samples


def _report(folder: Path, tar: float, int8: Path | None = None) -> Path:
    folder.mkdir(parents=True)
    report = {"pairs": 10, "auc": 0.9, "eer": 0.1, "tar_at_far": {"0.01": tar, "0.001": tar}}
    metrics = {"heldout": {"folds": [9, 10], "identities_disjoint": True}, "float": report, "int8": report,
               "parity": {"mean_cosine": 0.998}, "config": {"alpha": 0.2}, "data_hash": "ab" * 32}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    if int8 is not None:  # what `facegate train` exports; the built dlib int8 stands in (no training here)
        (folder / "export").mkdir()
        shutil.copy(int8, folder / "export" / "embedder-int8.tflite")
    return folder


def _run(args: list[str]) -> Any:
    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_models_cli_register_promote_refuse_rollback(tmp_path: Path, built_models: Path) -> None:
    toml = tmp_path / "server.toml"
    toml.write_text(f'data_dir = "{tmp_path / "server"}"\n[models]\ndir = "{built_models}"\n'
                    "[mqtt]\nenabled = false\n")
    config = load_server_config(toml)
    generate_key(config.signing_key_path)
    load_chip_cipher(config)  # the server creates the chip key on its first start
    db = ["--config", str(toml)]
    int8 = built_models / "embedder-int8.tflite"
    first = _run(["models", "register", str(_report(tmp_path / "r1", 0.8, int8)), *db])
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["version"] == "embedder-v1"
    promoted = json.loads(_run(["models", "promote", "embedder-v1", *db]).stdout)
    assert promoted["promoted"] is True and promoted["bundle"]["sequence"] == 1
    assert (promoted["chips"], promoted["reembedded"]) == (0, 0)
    _run(["models", "register", str(_report(tmp_path / "r2", 0.5, int8)), *db])
    refused = CliRunner().invoke(main, ["models", "promote", "embedder-v2", *db])
    assert refused.exit_code == 1
    assert "below the current" in refused.output
    _run(["models", "register", str(_report(tmp_path / "r3", 0.81, int8)), *db])
    assert json.loads(_run(["models", "promote", "embedder-v3", *db]).stdout)["current"] == "embedder-v1"
    listing = json.loads(_run(["models", "list", *db]).stdout)["models"]
    assert [(m["version"], m["status"], m["parent"]) for m in listing] == [
        ("embedder-v1", "retired", None), ("embedder-v2", "refused", "embedder-v1"),
        ("embedder-v3", "promoted", "embedder-v1")]
    back = json.loads(_run(["models", "rollback", *db]).stdout)
    assert (back["withdrawn"], back["restored"]) == ("embedder-v3", "embedder-v1")
    assert back["bundle"]["sequence"] == 3
    assert sorted(p.name for p in config.bundles_root.iterdir() if p.is_dir()) == ["1", "2", "3"]


def test_models_cli_promotion_without_server_context_fails(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the default data_dir (var/server) is empty here: no keys, no models
    db = ["--db", f"sqlite:///{tmp_path / 'reg.db'}"]
    assert _run(["models", "register", str(_report(tmp_path / "r1", 0.8)), *db]).exit_code == 0
    failed = CliRunner().invoke(main, ["models", "promote", "embedder-v1", *db])
    assert failed.exit_code == 1 and "reembed-gallery" in failed.output
    listing = json.loads(_run(["models", "list", *db]).stdout)["models"]
    assert [m["status"] for m in listing] == ["candidate"]


def test_load_samples_from_folders_and_csv(tmp_path: Path) -> None:
    for person in ("ann", "bob"):
        (tmp_path / "faces" / person).mkdir(parents=True)
        for i in range(2):
            (tmp_path / "faces" / person / f"{i}.jpg").write_bytes(b"x")
    samples = load_samples(tmp_path / "faces")
    assert [(s.key, s.identity) for s in samples][:2] == [("ann/0.jpg", "ann"), ("ann/1.jpg", "ann")]
    (tmp_path / "faces" / "identities.csv").write_text("path,identity\nann/0.jpg,A\nbob/1.jpg,B\n")
    assert [s.identity for s in load_samples(tmp_path / "faces")] == ["A", "B"]


def test_workflow_refuses_training_identities_from_the_heldout_folds(tmp_path: Path) -> None:
    from server.training.workflow import RunInputs, prepare_data

    data = tmp_path / "faces"
    for person in ("ann", "bob", "dan"):
        (data / person).mkdir(parents=True)
        (data / person / "0.jpg").write_bytes(b"x")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("fold,path_a,path_b,same\n9,ann/0.jpg,bob/0.jpg,0\n1,dan/0.jpg,dan/1.jpg,1\n")

    class NeverCalled:
        ident = "never"

        def __call__(self, path: Path) -> None:
            raise AssertionError("the guard must refuse before any chip is cut")

    inputs = RunInputs(data=data, pairs_csv=pairs, report_dir=tmp_path / "r", exclude_heldout=False,
                       cache_dir=tmp_path / "cache", progress=False)
    with pytest.raises(IdentityLeakError, match="2 training identities"):
        prepare_data(inputs, NeverCalled())


def test_visualize_grid_on_a_tiny_model(tmp_path: Path) -> None:
    pytest.importorskip("keras")
    from server.training.models import StudentSpec, build_student
    from server.training.visualize import VisualizeError, layer_names, visualize

    model = build_student(StudentSpec(96, 0.25, (1, 1, 1, 1, 1), 16))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (12, 150, 150, 3), dtype=np.uint8)
    early, deep = layer_names(model)[2], layer_names(model)[-6]
    for layer in (early, deep):
        out = tmp_path / f"{layer}.png"
        summary = visualize(model, layer, images, 3, out)
        assert out.stat().st_size > 1000 and len(summary["units"]) == 3
        assert 1 <= summary["field_px"][0] <= 150
    with pytest.raises(VisualizeError, match="not a spatial layer"):
        visualize(model, "embedding", images, 3, tmp_path / "x.png")
    with pytest.raises(VisualizeError, match="at least 9 images"):
        visualize(model, early, images[:3], 3, tmp_path / "x.png")


def test_prepare_data_cuts_chips_with_the_product_pipeline_and_caches_them(
        tmp_path: Path, shared_dir: Path, built_models: Path) -> None:
    from server.training.chips import PipelineChipMaker
    from server.training.data import pair_identities
    from server.training.workflow import RunInputs, prepare_data

    faces = shared_dir / "data" / "celeba-faces"
    held_out = pair_identities(faces / "pairs.csv")
    train_ids = sorted({s.identity for s in load_samples(faces)} - held_out)[:3]
    rows = [s for s in load_samples(faces) if s.identity in train_ids]
    csv_path = tmp_path / "identities.csv"
    csv_path.write_text("path,identity\n" + "".join(f"{s.path},{s.identity}\n" for s in rows))
    inputs = RunInputs(data=csv_path, pairs_csv=faces / "pairs.csv", report_dir=tmp_path / "r",
                       models_dir=built_models, cache_dir=tmp_path / "cache", progress=False)
    with PipelineChipMaker(built_models) as maker:
        train, held, pairs, record = prepare_data(inputs, maker)
        assert train.chips.shape[1:] == (150, 150, 3) and len(train.keys) >= 0.9 * len(rows)
        assert set(train.identities) == set(train_ids) and record["identities_disjoint"] is True
        assert len(pairs.same) == 1200 and held.ok.mean() > 0.95
        cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
        again, *_ = prepare_data(inputs, maker)  # served from the .npz cache
    assert np.array_equal(again.chips, train.chips)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == cached
