"""``train pairs-head``: fit the DeepFace-style head on embedding pairs and compare it with cosine.

Training pairs are drawn from the training identities only (held-out identities removed and the
disjointness checked, as for triplet training); the head and the plain cosine score are then both
evaluated on the held-out pairs with the same metrics code.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from server.training.chips import ChipMaker, PipelineChipMaker
from server.training.evaluate import embed_keras, embed_tflite, evaluate_embeddings, report_dict
from server.training.head import build_head, head_logits, train_head
from server.training.report import plot_det, plot_roc, write_json
from server.training.trainer import load_model, save_model_atomic
from server.training.workflow import RunInputs, prepare_data

logger = logging.getLogger(__name__)

VALIDATION_SHARE = 0.1  # of the generated training pairs, held back for the head's val curves


class HeadTrainingError(ValueError):
    """The head cannot be trained on this data or embedder."""


def embed_with(model_path: Path, chips: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    """Unit embeddings from a ``.keras`` or ``.tflite`` embedder."""
    if model_path.suffix == ".tflite":
        return embed_tflite(model_path, chips)[0]
    if model_path.suffix == ".keras":
        return embed_keras(load_model(model_path), chips)
    raise HeadTrainingError(f"embedder must be a .keras or .tflite file, got {model_path}")


def sample_pairs(labels: npt.NDArray[np.int32], count: int, seed: int = 0,
                 ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int32]]:
    """``count`` index pairs, half genuine (same label, different rows) and half impostor."""
    rng = np.random.default_rng(seed)
    by_label = {int(lab): np.flatnonzero(labels == lab) for lab in np.unique(labels)}
    multi = [lab for lab, idx in by_label.items() if len(idx) >= 2]
    if not multi or len(by_label) < 2:
        raise HeadTrainingError("need identities with 2+ chips and at least two identities")
    half = count // 2
    a, b = [], []
    for lab in rng.choice(multi, size=half):
        i, j = rng.choice(by_label[int(lab)], size=2, replace=False)
        a.append(i)
        b.append(j)
    while len(a) < count:
        i, j = rng.integers(0, len(labels), size=2)
        if labels[i] != labels[j]:
            a.append(i)
            b.append(j)
    same = np.array([1] * half + [0] * (count - half), np.int32)
    return np.array(a), np.array(b), same


def run_pairs_head(inputs: RunInputs, embedder: Path, kind: str = "abs", pairs: int = 20000,
                   epochs: int = 20, learning_rate: float = 1e-2, seed: int = 0,
                   maker: ChipMaker | None = None) -> dict[str, Any]:
    """Train the head on generated training pairs; evaluate head and cosine on the held-out pairs."""
    from server.training.data import encode_labels

    chip_maker: ChipMaker = maker if maker is not None else PipelineChipMaker(inputs.models_dir)
    try:
        train, held, heldout_pairs, record = prepare_data(inputs, chip_maker)
    finally:
        if maker is None and isinstance(chip_maker, PipelineChipMaker):
            chip_maker.close()
    labels, _ = encode_labels(train.identities)
    train_emb = embed_with(embedder, train.chips)
    held_emb = embed_with(embedder, held.chips)
    ia, ib, same = sample_pairs(labels, pairs, seed)
    n_val = int(len(same) * VALIDATION_SHARE)
    order = np.random.default_rng(seed + 1).permutation(len(same))
    val, fit = order[:n_val], order[n_val:]
    model = build_head(train_emb.shape[1], kind)
    model.summary(print_fn=lambda line, *_a, **_k: logger.debug("%s", line))
    history = train_head(model, train_emb[ia[fit]], train_emb[ib[fit]], same[fit], epochs,
                         learning_rate=learning_rate,
                         validation=(train_emb[ia[val]], train_emb[ib[val]], same[val]))
    logits = head_logits(model, held_emb[heldout_pairs.index_a], held_emb[heldout_pairs.index_b])
    failed = ~(held.ok[heldout_pairs.index_a] & held.ok[heldout_pairs.index_b])
    logits[failed] = -np.inf
    head_report = report_dict(logits, heldout_pairs.same, int(failed.sum()))
    cosine_report, cosine_scores = evaluate_embeddings(held_emb, held.ok, heldout_pairs)
    inputs.report_dir.mkdir(parents=True, exist_ok=True)
    model_path = save_model_atomic(model, inputs.report_dir / f"pairs_head_{kind}.keras")
    curves = {f"head ({kind})": (logits, heldout_pairs.same), "cosine": (cosine_scores, heldout_pairs.same)}
    plot_roc(curves, inputs.report_dir / "roc.png")
    plot_det(curves, inputs.report_dir / "det.png")
    metrics = {"kind": kind, "embedder": str(embedder), "heldout": record, "head": head_report,
               "cosine": cosine_report, "float": head_report, "model": str(model_path),
               "train_pairs": len(fit), "epochs": epochs,
               "final_val_loss": float(history.history.get("val_loss", [float("nan")])[-1])}
    write_json(inputs.report_dir / "metrics.json", metrics)
    return metrics
