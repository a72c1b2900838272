"""Embed chips with a Keras or TFLite embedder and score the held-out pairs like `eval verify` does.

A pair whose face was not found scores -inf (a failure counted against the model, not a skip).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import numpy.typing as npt

from models.runtime.interpreter import TFLiteModel
from server.evaluation.metrics import REPORT_FARS, verification_report
from server.evaluation.verify import PairRow
from server.training.chips import ChipSet

logger = logging.getLogger(__name__)

PREDICT_BATCH = 32  # chips per predict() call: bounded memory on small servers


class EvaluationError(ValueError):
    """The held-out pairs cannot be scored (missing chips, bad arrays)."""


@dataclass(frozen=True, slots=True)
class PairSet:
    """Held-out pairs as row indices into a chip set, their labels, and the pairs' fold numbers."""

    index_a: npt.NDArray[np.int64]
    index_b: npt.NDArray[np.int64]
    same: npt.NDArray[np.int32]

    @classmethod
    def from_rows(cls, rows: Sequence[PairRow], chipset: ChipSet) -> PairSet:
        """Map pair paths to chip rows; raise EvaluationError when a path has no chip row."""
        lookup = chipset.lookup()
        missing = [k for r in rows for k in (r.path_a, r.path_b) if k not in lookup]
        if missing:
            raise EvaluationError(f"{len(missing)} pair images have no chip (first: {missing[0]})")
        return cls(np.array([lookup[r.path_a] for r in rows]), np.array([lookup[r.path_b] for r in rows]),
                   np.array([r.same for r in rows], np.int32))


def normalize(x: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    """Rows scaled to unit length."""
    arr: npt.NDArray[np.float32] = np.asarray(x, np.float32)
    norms: npt.NDArray[np.float32] = np.maximum(np.linalg.norm(arr, axis=1, keepdims=True), 1e-12)
    out: npt.NDArray[np.float32] = (arr / norms).astype(np.float32)
    return out


def embed_keras(model: keras.Model, inputs: npt.NDArray[Any],
                batch_size: int = PREDICT_BATCH) -> npt.NDArray[np.float32]:
    """Unit-length embeddings of ``inputs`` with the model in inference mode."""
    out = model.predict(np.asarray(inputs, np.float32), batch_size=batch_size, verbose=0)
    return normalize(out)


def embed_tflite(path: Path, chips: npt.NDArray[Any],
                 threads: int = 1) -> tuple[npt.NDArray[np.float32], float]:
    """(unit-length embeddings, median ms per chip) with a TFLite embedder, one chip per invoke."""
    times = []
    out = []
    with TFLiteModel(path, threads=threads) as model:
        shape = model.input.shape
        for chip in chips:
            x = np.asarray(chip, np.float32).reshape(shape)
            start = time.perf_counter()
            out.append(model.run(x).reshape(-1))
            times.append((time.perf_counter() - start) * 1000.0)
    return normalize(np.stack(out)), float(np.median(times))


def cosine_scores(emb: npt.NDArray[np.float32], ok: npt.NDArray[np.bool_],
                  pairs: PairSet) -> npt.NDArray[np.float64]:
    """Cosine similarity per pair, -inf where either face was not found."""
    products = emb[pairs.index_a] * emb[pairs.index_b]
    scores: npt.NDArray[np.float64] = np.sum(products, axis=1).astype(np.float64)
    failed = ~(ok[pairs.index_a] & ok[pairs.index_b])
    scores[failed] = -np.inf
    return scores


def report_dict(scores: npt.NDArray[np.float64], same: npt.NDArray[np.int32],
                fail_to_detect: int) -> dict[str, Any]:
    """`eval verify`-shaped figures: pairs, auc, eer, tar_at_far (0.01, 0.001), fail_to_detect."""
    report = verification_report(scores, same, REPORT_FARS).as_dict()
    report["fail_to_detect"] = int(fail_to_detect)
    return report


def evaluate_embeddings(emb: npt.NDArray[np.float32], ok: npt.NDArray[np.bool_],
                        pairs: PairSet) -> tuple[dict[str, Any], npt.NDArray[np.float64]]:
    """(report, scores) of cosine verification on the held-out pairs."""
    scores = cosine_scores(emb, ok, pairs)
    return report_dict(scores, pairs.same, int(np.isinf(scores).sum())), scores


def tar_at_1e3(report: dict[str, Any]) -> float:
    """TAR at FAR = 1e-3 from a report dict."""
    return float(report["tar_at_far"]["0.001"])
