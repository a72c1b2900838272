"""The triplet training workflow: create, compile, fit, evaluate, save, report, with checkpoints and resume.

``Trainer`` follows the Keras workflow users know. It prints ``model.summary()``, compiles with the
mined ``TripletLoss`` and the active-triplet metrics, fits on P x K batches with a rich progress bar,
checkpoints every epoch (``checkpoints/last.keras`` + ``state.json``), evaluates on held-out pairs,
saves ``model.keras`` (checking that it loads back with the same outputs) and writes the report folder.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import keras
import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from core.files import atomic_write_bytes
from server.training.data import PKBatches
from server.training.losses import Mining
from server.training.models import (
    StudentSpec,
    build_student,
    copy_weights_by_name,
    finetune_start,
    load_dlib_teacher,
    split_frozen,
)
from server.training.objectives import ActiveTriplets, AllActiveTriplets, TripletLoss
from server.training.progress import RichProgress

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.keras"
STATE_FILE = "state.json"
HISTORY_FILE = "history.csv"
MODEL_FILE = "model.keras"
# Max |difference| between the saved-and-reloaded model and the in-memory one (float32 round trip).
ROUNDTRIP_TOLERANCE = 1e-5
ROUNDTRIP_CHIPS = 4
VALIDATION_STEPS = 4  # held-out P x K batches per epoch: enough for a curve, cheap on 2 cores


class TrainingError(Exception):
    """Training cannot start or continue (bad settings, mismatching checkpoint)."""


class TrainConfig(BaseModel):
    """Hyper-parameters of one triplet run (stored with the model's lineage)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    init: Literal["dlib", "student"] = Field("student", description="Start from dlib or a fresh student.")
    epochs: int = Field(10, ge=1, le=10_000, description="Epochs to train (total, across resumes).")
    steps_per_epoch: int = Field(50, ge=1, le=100_000, description="P x K batches per epoch.")
    p: int = Field(16, ge=2, le=1024, description="Identities per batch.")
    k: int = Field(4, ge=2, le=64, description="Images per identity per batch.")
    mining: Mining = Field("semi-hard", description="Online triplet mining.")
    alpha: float = Field(0.2, gt=0.0, le=4.0, description="Triplet margin on squared unit distances.")
    reduce: Literal["sum", "mean"] = Field("sum", description="Sum (FaceNet) or mean over triplets.")
    learning_rate: float = Field(1e-3, gt=0.0, le=1.0, description="Adam learning rate.")
    freeze_blocks: int = Field(0, ge=0, le=1000, description="dlib: leading residual blocks kept frozen.")
    cache_trunk: bool = Field(True, description="dlib: compute the frozen trunk once and train the rest.")
    student_size: Literal[96, 112] = Field(112, description="Student input side.")
    student_width: float = Field(1.0, gt=0.0, le=2.0, description="Student width multiplier.")
    student_activation: Literal["relu6", "relu", "prelu"] = Field("relu6", description="Student activation.")
    distill: Literal["none", "cosine", "mse"] = Field("cosine", description="Student: distillation term.")
    distill_weight: float = Field(1.0, ge=0.0, le=100.0, description="Weight of the distillation term.")
    distill_center: bool = Field(True, description="Distil toward teacher embeddings minus their mean "
                                 "(dlib's descriptors share one dominant direction).")
    flip: bool = Field(False, description="Mirror half the training chips (not with distillation).")
    seed: int = Field(0, ge=0, description="Seed of batch sampling and initialisation.")

    def uses_teacher(self) -> bool:
        """True when the run needs the dlib teacher's embeddings."""
        return self.init == "student" and self.distill != "none"


@dataclass
class TrainResult:
    """What a run produced."""

    model: keras.Model
    model_path: Path
    history: dict[str, list[float]]
    epochs_run: int
    roundtrip_max_abs_diff: float
    extra: dict[str, Any] = field(default_factory=dict)


def _print_summary(model: keras.Model) -> None:
    model.summary(print_fn=lambda line, *_a, **_k: print(line, file=sys.stderr))


def save_model_atomic(model: keras.Model, path: Path) -> Path:
    """Save a .keras file via a temp name in the same folder and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.keras")
    model.save(tmp)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path


def load_model(path: Path) -> keras.Model:
    """Load a .keras model saved by the trainer (custom losses/metrics are registered)."""
    import server.training.head  # registers PairFeatures
    import server.training.objectives  # noqa: F401  registers the loss and metrics

    try:
        return keras.saving.load_model(path)
    except (OSError, ValueError, TypeError) as exc:
        raise TrainingError(f"cannot load model {path}: {exc}") from exc


class EpochCheckpoint(keras.callbacks.Callback):  # type: ignore[misc]  # keras is untyped
    """Save ``last.keras`` (weights + optimizer) and ``state.json`` after every epoch; log the figures."""

    def __init__(self, folder: Path, config: TrainConfig) -> None:
        super().__init__()
        self.folder, self.config = folder, config

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        """Checkpoint and log this epoch."""
        logs = logs or {}
        save_model_atomic(self.model, self.folder / LAST_CHECKPOINT)
        state = {"epoch": epoch + 1, "config": self.config.model_dump(mode="json")}
        atomic_write_bytes(self.folder / STATE_FILE, json.dumps(state, indent=2).encode("utf-8"))
        logger.info("epoch %d: loss %.4f, active triplets %.3f (all triplets %.3f)", epoch + 1,
                    float(logs.get("loss", float("nan"))), float(logs.get("active_fraction", float("nan"))),
                    float(logs.get("active_all_fraction", float("nan"))))


def _same_run(saved: dict[str, Any], config: TrainConfig) -> bool:
    """A checkpoint resumes a run when every setting but the epoch count matches."""
    now = config.model_dump(mode="json")
    def strip(d: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in d.items() if k != "epochs"}

    return strip(saved) == strip(now)


@dataclass
class Prepared:
    """The model to fit, the full embedder it updates, and the arrays it is fed."""

    fit_model: keras.Model
    full_model: keras.Model
    to_inputs: Callable[[npt.NDArray[Any]], npt.NDArray[Any]]
    split: bool


def create_models(config: TrainConfig, builder: Callable[[], keras.Model] | None = None) -> Prepared:
    """Create the embedder for ``config`` (and its frozen trunk when fine-tuning with a cached trunk)."""
    if builder is not None:
        full = builder()
    elif config.init == "student":
        full = build_student(StudentSpec(config.student_size, config.student_width,
                                         activation=config.student_activation))
    else:
        full = finetune_start(config.freeze_blocks)
    if config.init == "dlib" and config.cache_trunk and config.freeze_blocks > 0:
        trunk, rest = split_frozen(full, config.freeze_blocks)
        return Prepared(rest, full, lambda chips: trunk.predict(np.asarray(chips, np.float32),
                                                                batch_size=32, verbose=0), True)
    return Prepared(full, full, lambda chips: chips, False)


def compile_model(model: keras.Model, config: TrainConfig) -> None:
    """Adam + mined TripletLoss (+ distillation) + active-triplet metrics."""
    distill = config.distill if config.uses_teacher() else "none"
    model.compile(
        optimizer=keras.optimizers.Adam(config.learning_rate),
        loss=TripletLoss(config.mining, config.alpha, config.reduce, distill, config.distill_weight),
        metrics=[ActiveTriplets(config.mining, config.alpha), AllActiveTriplets(config.alpha)],
    )


def teacher_embeddings(chips: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    """The dlib teacher's embeddings of the chips (unit length)."""
    from server.training.evaluate import embed_keras

    return embed_keras(load_dlib_teacher(), chips)


class Trainer:
    """One triplet training run writing into ``report_dir``."""

    def __init__(self, config: TrainConfig, report_dir: Path, progress: bool = True,
                 builder: Callable[[], keras.Model] | None = None) -> None:
        self.config, self.report_dir = config, Path(report_dir)
        self.progress, self.builder = progress, builder
        self.ckpt_dir = self.report_dir / CHECKPOINT_DIR

    def _resume_state(self, resume: bool) -> int:
        state_path = self.ckpt_dir / STATE_FILE
        if not resume or not state_path.is_file():
            return 0
        state = json.loads(state_path.read_text(encoding="utf-8"))
        if not _same_run(state.get("config", {}), self.config):
            raise TrainingError(f"checkpoint in {self.ckpt_dir} was made with other settings; "
                                "use a new --report folder or the same settings")
        return int(state["epoch"])

    def fit(self, chips: npt.NDArray[Any], labels: npt.NDArray[np.int32], resume: bool = False,
            teacher: npt.NDArray[np.float32] | None = None,
            validation: tuple[npt.NDArray[Any], npt.NDArray[np.int32]] | None = None) -> TrainResult:
        """Create (or resume), compile, fit, evaluate; save ``model.keras`` and check the round trip.

        ``validation`` (held-out chips, labels) adds per-epoch ``val_*`` figures and a final
        ``model.evaluate`` on held-out P x K batches (``extra['heldout']``).
        """
        keras.utils.set_random_seed(self.config.seed)
        prepared = create_models(self.config, self.builder)
        initial_epoch = self._resume_state(resume)
        if initial_epoch:
            loaded = load_model(self.ckpt_dir / LAST_CHECKPOINT)  # weights and optimizer state
            prepared.fit_model = loaded
            if not prepared.split:
                prepared.full_model = loaded
            logger.info("resuming from epoch %d (%s)", initial_epoch, self.ckpt_dir)
        else:
            compile_model(prepared.fit_model, self.config)
        _print_summary(prepared.fit_model)
        inputs = prepared.to_inputs(chips)
        batches = PKBatches(inputs, labels, self.config.p, self.config.k, self.config.steps_per_epoch,
                            seed=self.config.seed, teacher=teacher if self.config.uses_teacher() else None,
                            flip=self.config.flip and not prepared.split)
        batches.epoch = initial_epoch
        val_batches = None
        if validation is not None:
            val_batches = PKBatches(prepared.to_inputs(validation[0]), validation[1], self.config.p,
                                    self.config.k, VALIDATION_STEPS, seed=self.config.seed + 1)
        callbacks: list[keras.callbacks.Callback] = [
            keras.callbacks.CSVLogger(str(self.report_dir / HISTORY_FILE), append=initial_epoch > 0),
            EpochCheckpoint(self.ckpt_dir, self.config),
        ]
        if self.progress:
            callbacks.insert(0, RichProgress(self.config.epochs, self.config.steps_per_epoch))
        self.report_dir.mkdir(parents=True, exist_ok=True)
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        if initial_epoch < self.config.epochs:
            try:
                prepared.fit_model.fit(batches, epochs=self.config.epochs, initial_epoch=initial_epoch,
                                       validation_data=val_batches, verbose=0, callbacks=callbacks)
            except KeyboardInterrupt:
                logger.warning("interrupted; the last finished epoch is checkpointed in %s: rerun with "
                               "--resume to continue", self.ckpt_dir)
                raise
        extra: dict[str, Any] = {}
        if val_batches is not None:
            extra["heldout"] = {k: float(v) for k, v in prepared.fit_model.evaluate(
                val_batches, verbose=0, return_dict=True).items()}
        if prepared.split:
            copy_weights_by_name(prepared.fit_model, prepared.full_model)
        model_path = save_model_atomic(prepared.full_model, self.report_dir / MODEL_FILE)
        diff = roundtrip_diff(prepared.full_model, model_path, chips[:ROUNDTRIP_CHIPS])
        from server.training.report import read_history

        history = read_history(self.report_dir / HISTORY_FILE)
        return TrainResult(prepared.full_model, model_path, history,
                           self.config.epochs - initial_epoch, diff, extra)


def roundtrip_diff(model: keras.Model, path: Path, sample: npt.NDArray[Any]) -> float:
    """Max |output difference| between ``model`` and the model loaded back from ``path``."""
    reloaded = load_model(path)
    x = np.asarray(sample, np.float32)
    diff = float(np.max(np.abs(model.predict(x, verbose=0) - reloaded.predict(x, verbose=0))))
    if diff > ROUNDTRIP_TOLERANCE:
        raise TrainingError(f"saved model {path} does not reproduce the trained one (max diff {diff:.2e})")
    return diff
