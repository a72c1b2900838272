"""Figures of the built, unchanged dlib-converted embedder on the held-out folds: the first registry model.

The converted dlib model was trained by dlib's author on data outside facegate, so there are no
facegate training identities to check against the held-out ones; the record says so explicitly
(``trained_on: external``) and the gate accepts that instead of a disjointness check.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from models.runtime.assets import default_models_dir
from models.runtime.manifest import load_manifest, verify_entry
from server.training.chips import PipelineChipMaker, make_chips
from server.training.data import read_pairs
from server.training.evaluate import PairSet, embed_tflite, evaluate_embeddings
from server.training.workflow import heldout_samples

logger = logging.getLogger(__name__)

INT8_ENTRY = "embedder-int8"
FLOAT_ENTRY = "embedder-float32"


def baseline_metrics(models_dir: Path | None, pairs_csv: Path, folds: tuple[int, ...],
                     cache_dir: Path | None = None, progress: bool = True,
                     ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics, artifacts) of the built float32 and int8 embedders on the held-out pairs."""
    folder = models_dir or default_models_dir()
    manifest = load_manifest(folder)
    int8_entry, float_entry = manifest.get(INT8_ENTRY), manifest.get(FLOAT_ENTRY)
    int8_path, float_path = verify_entry(folder, int8_entry), verify_entry(folder, float_entry)
    with PipelineChipMaker(models_dir) as maker:
        held = make_chips(heldout_samples(pairs_csv, folds), maker, cache_dir, "heldout", progress)
    pairs = PairSet.from_rows(read_pairs(pairs_csv, folds), held)
    int8_emb, int8_ms = embed_tflite(int8_path, held.chips)
    float_emb, float_ms = embed_tflite(float_path, held.chips)
    int8_report, _ = evaluate_embeddings(int8_emb, held.ok, pairs)
    float_report, _ = evaluate_embeddings(float_emb, held.ok, pairs)
    ok = held.ok
    cos = (int8_emb[ok] * float_emb[ok]).sum(axis=1)
    metrics = {
        "heldout": {"pairs_csv": str(pairs_csv), "folds": list(folds), "trained_on": "external",
                    "heldout_chips": int(ok.sum())},
        "int8": int8_report, "float": float_report,
        "parity": {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()), "chips": int(ok.sum())},
        "latency_ms_1thread": {"int8_embed_median": int8_ms, "float32_embed_median": float_ms},
    }
    artifacts = {"int8": str(int8_path), "float32": str(float_path), "int8_sha256": int8_entry.sha256,
                 "float32_sha256": float_entry.sha256, "manifest_version": int8_entry.version}
    return metrics, artifacts
