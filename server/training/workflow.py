"""One ``train triplet`` run end to end: data, guard, chips, fit, held-out evaluation, export, report.

Held-out pairs are folds 9-10 of the shared ``pairs.csv`` by default. Their identities are removed
from the training data and the disjointness is then checked in code (``check_disjoint``) before any
training starts; the check's result is recorded in the metrics the gate reads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from server.training.chips import ChipMaker, ChipSet, PipelineChipMaker, make_chips
from server.training.data import (
    EVAL_FOLDS,
    DataError,
    Sample,
    check_disjoint,
    data_hash,
    encode_labels,
    exclude_identities,
    load_samples,
    pair_identities,
    read_pairs,
)
from server.training.evaluate import PairSet, embed_keras, embed_tflite, evaluate_embeddings, tar_at_1e3
from server.training.report import write_report
from server.training.trainer import TrainConfig, Trainer, teacher_embeddings

logger = logging.getLogger(__name__)

TEACHER_CACHE_PREFIX = "teacher-dlib"


@dataclass
class RunInputs:
    """Where the data comes from and where the run writes."""

    data: Path
    pairs_csv: Path
    report_dir: Path
    folds: tuple[int, ...] = EVAL_FOLDS
    models_dir: Path | None = None
    cache_dir: Path | None = None
    exclude_heldout: bool = True
    export: bool = True
    reference: bool = True
    resume: bool = False
    progress: bool = True


@dataclass
class RunOutcome:
    """What the run measured and wrote."""

    metrics: dict[str, Any]
    model_path: Path
    artifacts: dict[str, Any] = field(default_factory=dict)
    data_hash: str = ""


def heldout_samples(pairs_csv: Path, folds: tuple[int, ...]) -> list[Sample]:
    """Every image named by the held-out pairs (identity from identities.csv beside it, else the folder)."""
    root = pairs_csv.parent
    index: dict[str, str] = {}
    if (root / "identities.csv").is_file():
        index = {s.key: s.identity for s in load_samples(root / "identities.csv")}
    keys = sorted({k for r in read_pairs(pairs_csv, folds) for k in (r.path_a, r.path_b)})
    return [Sample(root / k, k, index.get(k, Path(k).parent.name)) for k in keys]


def _teacher(chipset: ChipSet, cache: Path | None) -> npt.NDArray[np.float32]:
    from core.files import atomic_write_bytes
    from server.training.chips import default_cache_dir

    name = f"{TEACHER_CACHE_PREFIX}-{chipset.cache_id}-{len(chipset.keys)}.npy"
    path = (cache or default_cache_dir()) / name
    if path.is_file():
        cached = np.load(path, allow_pickle=False)
        if cached.shape[0] == len(chipset.keys):
            return np.asarray(cached, np.float32)
    emb = teacher_embeddings(chipset.chips)
    import io

    buffer = io.BytesIO()
    np.save(buffer, emb)
    atomic_write_bytes(path, buffer.getvalue())
    return emb


def center_teacher(teacher: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Teacher embeddings minus their mean, re-normalised.

    dlib's unit descriptors all lie near one direction (mean pairwise cosine about 0.87 on the training
    chips), so plain cosine distillation is mostly satisfied by that shared direction; removing it makes
    the student spend its capacity on what tells people apart. Cosine scores in the centred space rank
    pairs like the teacher's distances do, and gallery and probes both come from the student.
    """
    centred = teacher - teacher.mean(axis=0, keepdims=True)
    norms = np.maximum(np.linalg.norm(centred, axis=1, keepdims=True), 1e-12)
    out: npt.NDArray[np.float32] = (centred / norms).astype(np.float32)
    return out


def prepare_data(inputs: RunInputs, maker: ChipMaker) -> tuple[ChipSet, ChipSet, PairSet, dict[str, Any]]:
    """(training chips, held-out chips, held-out pairs, held-out record) with the identity guard applied."""
    held_ids = pair_identities(inputs.pairs_csv, inputs.folds)
    samples = load_samples(inputs.data)
    if inputs.exclude_heldout:
        samples = exclude_identities(samples, held_ids)
    check_disjoint({s.identity for s in samples}, held_ids)  # the guard: raises IdentityLeakError
    train = make_chips(samples, maker, inputs.cache_dir, "train", inputs.progress).only_ok()
    held = make_chips(heldout_samples(inputs.pairs_csv, inputs.folds), maker, inputs.cache_dir, "heldout",
                      inputs.progress)
    check_disjoint(set(train.identities), set(held.identities))  # again on what is actually used
    pairs = PairSet.from_rows(read_pairs(inputs.pairs_csv, inputs.folds), held)
    record = {"pairs_csv": str(inputs.pairs_csv), "folds": list(inputs.folds), "identities_disjoint": True,
              "train_identities": len(set(train.identities)), "heldout_identities": len(held_ids),
              "train_chips": len(train.keys), "heldout_chips": int(held.ok.sum())}
    if len(train.keys) == 0:
        raise DataError("no training chip has a face: check the data folder")
    return train, held, pairs, record


def _last(history: dict[str, list[float]], key: str) -> float | None:
    values = history.get(key)
    return values[-1] if values else None


def run_triplet(config: TrainConfig, inputs: RunInputs, maker: ChipMaker | None = None) -> RunOutcome:
    """The whole ``train triplet`` run; returns the metrics that also land in ``metrics.json``."""
    own_maker = maker is None
    chip_maker: ChipMaker = maker if maker is not None else PipelineChipMaker(inputs.models_dir)
    try:
        train, held, pairs, record = prepare_data(inputs, chip_maker)
    finally:
        if own_maker and isinstance(chip_maker, PipelineChipMaker):
            chip_maker.close()
    labels, _names = encode_labels(train.identities)
    held_ok = held.only_ok()
    held_labels, _ = encode_labels(held_ok.identities)
    teacher = _teacher(train, inputs.cache_dir) if config.uses_teacher() else None
    if teacher is not None and config.distill_center:
        teacher = center_teacher(teacher)
    curves: dict[str, tuple[Any, Any]] = {}
    metrics: dict[str, Any] = {"config": config.model_dump(mode="json"), "heldout": record}
    if inputs.reference:
        from server.training.models import load_dlib_teacher

        ref_emb = embed_keras(load_dlib_teacher(), held.chips)
        ref_report, ref_scores = evaluate_embeddings(ref_emb, held.ok, pairs)
        metrics["reference_dlib_float"] = ref_report
        curves["dlib converted (float)"] = (ref_scores, pairs.same)
    trainer = Trainer(config, inputs.report_dir, progress=inputs.progress)
    result = trainer.fit(train.chips, labels, resume=inputs.resume, teacher=teacher,
                         validation=(held_ok.chips, held_labels))
    report, scores = evaluate_embeddings(embed_keras(result.model, held.chips), held.ok, pairs)
    metrics.update(float=report, heldout_triplet=result.extra.get("heldout", {}),
                   roundtrip_max_abs_diff=result.roundtrip_max_abs_diff,
                   final_active_fraction=_last(result.history, "active_fraction"),
                   final_active_all_fraction=_last(result.history, "active_all_fraction"))
    curves[f"trained {config.init} (float)"] = (scores, pairs.same)
    artifacts: dict[str, Any] = {"keras": str(result.model_path)}
    if inputs.export:
        from server.training.export import export_candidate

        exported = export_candidate(result.model, train.chips, held_ok.chips, inputs.report_dir / "export",
                                    config.seed)
        int8_emb, int8_ms = embed_tflite(exported.int8_path, held.chips)
        int8_report, int8_scores = evaluate_embeddings(int8_emb, held.ok, pairs)
        metrics.update(int8=int8_report, parity=exported.parity(),
                       latency_ms_1thread={"int8": exported.latency_ms_int8,
                                           "float32": exported.latency_ms_float,
                                           "int8_embed_median": int8_ms})
        curves[f"trained {config.init} (int8)"] = (int8_scores, pairs.same)
        artifacts.update(exported.artifacts())
    digest = data_hash(train.keys, train.identities, train.cache_id)
    metrics["data_hash"] = digest
    write_report(inputs.report_dir, result.history, curves, metrics)
    reference = metrics.get("reference_dlib_float")
    logger.info("held-out TAR@FAR=1e-3: trained %.4f, dlib reference %s", tar_at_1e3(report),
                "n/a" if reference is None else f"{tar_at_1e3(reference):.4f}")
    return RunOutcome(metrics, result.model_path, artifacts, digest)
