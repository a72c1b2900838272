"""A two-epoch tiny training run that lowers the loss, the save/load round trip, resume, and the report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from server.training.data import DataError, PKBatches  # noqa: E402
from server.training.models import StudentSpec, build_student  # noqa: E402
from server.training.report import write_report  # noqa: E402
from server.training.trainer import TrainConfig, Trainer, TrainingError, load_model  # noqa: E402

IDS, PER_ID = 8, 6
TINY = StudentSpec(input_size=96, width=0.25, repeats=(1, 1, 1, 1, 1), embedding_dim=16)


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Chips whose identity is a smooth colour pattern, plus per-image noise and brightness."""
    import cv2

    rng = np.random.default_rng(seed)
    chips, labels = [], []
    for ident in range(IDS):
        base = cv2.resize(rng.uniform(0, 255, (5, 5, 3)).astype(np.float32), (150, 150))
        for _ in range(PER_ID):
            img = base * rng.uniform(0.8, 1.2) + rng.normal(0, 12, base.shape)
            chips.append(np.clip(img, 0, 255).astype(np.uint8))
            labels.append(ident)
    return np.stack(chips), np.array(labels, np.int32)


def _config(**kw: object) -> TrainConfig:
    base = {"init": "student", "epochs": 2, "steps_per_epoch": 4, "p": 4, "k": 3, "mining": "batch-hard",
            "learning_rate": 3e-3, "distill": "none", "reduce": "mean", "seed": 1}
    base.update(kw)
    return TrainConfig.model_validate(base)


def _fixed_batch_loss(model: keras.Model, chips: np.ndarray, labels: np.ndarray, cfg: TrainConfig) -> float:
    from server.training.losses import mined_triplet_loss

    emb = model.predict(chips.astype(np.float32), verbose=0)
    loss, _ = mined_triplet_loss(emb, labels, "batch-hard", cfg.alpha, "mean")
    return float(loss)


def test_two_epochs_lower_the_loss_and_the_model_round_trips(tmp_path: Path) -> None:
    chips, labels = _data()
    cfg = _config()
    keras.utils.set_random_seed(cfg.seed)
    before = _fixed_batch_loss(build_student(TINY), chips, labels, cfg)  # same seed -> same initial weights
    trainer = Trainer(cfg, tmp_path / "run", progress=False, builder=lambda: build_student(TINY))
    result = trainer.fit(chips, labels, validation=(chips[:24], labels[:24]))
    after = _fixed_batch_loss(result.model, chips, labels, cfg)
    assert after < before
    assert result.epochs_run == 2 and len(result.history["loss"]) == 2
    assert {"active_fraction", "active_all_fraction", "val_loss"} <= set(result.history)
    assert 0.0 <= result.history["active_fraction"][-1] <= 1.0
    assert "loss" in result.extra["heldout"]
    # save/load round trip: the reloaded .keras gives the same embeddings
    reloaded = load_model(result.model_path)
    x = chips[:5].astype(np.float32)
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), result.model.predict(x, verbose=0), atol=1e-6)
    assert result.roundtrip_max_abs_diff <= 1e-5
    assert (tmp_path / "run" / "checkpoints" / "last.keras").is_file()


def test_resume_continues_from_the_checkpoint(tmp_path: Path) -> None:
    chips, labels = _data(1)
    report = tmp_path / "run"
    first = Trainer(_config(epochs=1), report, progress=False, builder=lambda: build_student(TINY))
    first.fit(chips, labels)
    state = json.loads((report / "checkpoints" / "state.json").read_text())
    assert state["epoch"] == 1
    second = Trainer(_config(epochs=2), report, progress=False, builder=lambda: build_student(TINY))
    result = second.fit(chips, labels, resume=True)
    assert result.epochs_run == 1  # only the missing epoch ran
    assert len(result.history["loss"]) == 2  # the history file was appended, not restarted
    with pytest.raises(TrainingError, match="other settings"):
        Trainer(_config(epochs=3, alpha=0.5), report, progress=False).fit(chips, labels, resume=True)


def test_distillation_target_is_packed_and_trains(tmp_path: Path) -> None:
    chips, labels = _data(2)
    teacher = np.random.default_rng(0).normal(size=(len(labels), 16)).astype(np.float32)
    cfg = _config(epochs=1, steps_per_epoch=2, distill="cosine")
    result = Trainer(cfg, tmp_path / "run", progress=False, builder=lambda: build_student(TINY)).fit(
        chips, labels, teacher=teacher)
    assert np.isfinite(result.history["loss"][0])


def test_report_folder_has_curves_roc_det_and_metrics(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.normal(1, 0.3, 50), rng.normal(0, 0.3, 50), [-np.inf]])
    labels = np.concatenate([np.ones(50), np.zeros(51)])
    history = {"loss": [1.0, 0.5], "active_fraction": [0.6, 0.3], "active_all_fraction": [0.2, 0.1]}
    files = write_report(tmp_path, history, {"trained": (scores, labels)}, {"tar": 0.5})
    names = {f.name for f in files}
    assert names == {"loss.png", "active_triplets.png", "roc.png", "det.png", "metrics.json"}
    assert all(f.stat().st_size > 1000 for f in files if f.suffix == ".png")
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"tar": 0.5}


def test_pk_batches_shape_and_guards() -> None:
    chips, labels = _data()
    batches = PKBatches(chips, labels, p=4, k=3, steps=2, seed=0)
    x, y = batches[0]
    assert x.shape == (12, 150, 150, 3) and y.shape == (12, 1)
    assert all(np.sum(y[:, 0] == lab) == 3 for lab in np.unique(y[:, 0]))
    assert np.array_equal(batches[0][1], y)  # reproducible within an epoch
    with pytest.raises(DataError, match="P >= 2"):
        PKBatches(chips, labels, p=1, k=3, steps=1)
    with pytest.raises(DataError, match="at least P=20"):
        PKBatches(chips, labels, p=20, k=2, steps=1)


def test_split_frozen_is_exact_and_shares_layers() -> None:
    from server.training.models import ModelBuildError, freeze_blocks, split_frozen, trainable_blocks

    model = build_student(TINY)
    n_blocks = len(trainable_blocks(model))
    trunk, rest = split_frozen(model, n_blocks - 1)
    x = _data()[0][:4].astype(np.float32)
    np.testing.assert_allclose(rest.predict(trunk.predict(x, verbose=0), verbose=0),
                               model.predict(x, verbose=0), atol=1e-5)
    assert all(not w.trainable for w in trunk.weights)
    # the rest shares the model's layer objects: changing it changes the model
    layer = rest.layers[-3]
    layer.set_weights([w * 0 for w in layer.get_weights()])
    assert not np.any(model.get_layer(layer.name).get_weights()[0])
    with pytest.raises(ModelBuildError, match="blocks"):
        freeze_blocks(model, n_blocks)
