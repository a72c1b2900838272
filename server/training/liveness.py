"""``facegate train liveness``: fine-tune a passive liveness head on the server, ready for the gate.

MiniFASNet's own classifier does not carry from one camera and crop to another (issue 20), and the
calibrated 5-number head on its logit margins still lets a fifth of the screen and print attacks through.
This trainer keeps MiniFASNet-2.7's weights and fits a new classifier on its pooled (GDC) features:

1. ``models.convert.liveness_features`` rewrites MiniFASNet-2.7 so the pooled 512 features are a second
   output (``export/liveness-features.tflite``); the door runs that file, so train and door features are
   the same numbers (``device.liveness.trained.FeatureModel`` extracts both).
2. Every labelled frame (BlazeFace's largest face, the face box, the patch and its mirror) gives its
   features and the MiniFASNet logits; ``--cache`` keeps the logits between runs.
3. ``server.evaluation.liveness_calibrate.calibrate`` measures the trained head beside the shipped scorers
   under both protocols: *leave one dataset out* (fitted on the other sets: a new camera) and *leave
   subjects out* (new people before the cameras it was trained on). Every figure is held out; the
   operating point of the trained head comes from out-of-fold scores of its training frames.
4. The final head (fitted on everything) is exported as ``export/liveness-head.tflite``, a ``(1, C)`` ->
   ``(1, 1)`` float32 model whose logit is mapped so that the config's ``[liveness.passive] threshold``
   and ``uncertain_band`` are its calibrated operating point. Its TFLite output is checked against the
   numpy head on every training frame.

``metrics.json`` holds the protocols, the final operating point and the parity figure;
``facegate models register --kind liveness REPORT`` then registers it and ``facegate models promote``
applies the liveness gate (``server.registry.gate``): promoted only when it beats the shipped scorer on
the held-out data. Nothing biometric is written: features stay in memory, the report holds rates.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from core.files import atomic_write_bytes

logger = logging.getLogger(__name__)

FEATURES_FILE = "liveness-features.tflite"
HEAD_FILE = "liveness-head.tflite"
EXPORT_SUBDIR = "export"
BASE_MODEL = "minifasnet-2.7"
BASELINE_SCORER = "head"  # what the doors ship today: the calibrated head on MiniFASNet's logit margins
PARITY_TOLERANCE = 1e-4  # largest |TFLite - numpy| genuine probability accepted at export


class LivenessTrainingError(Exception):
    """The trainer cannot run (no MiniFASNet, unusable labels, a failed export)."""


def data_hash(labels_csvs: tuple[Path, ...]) -> str:
    """sha256 over the labels (and kinds) files: which frames and labels the head was fitted on."""
    digest = hashlib.sha256()
    for path in labels_csvs:
        for file in (path, path.parent / "kinds.csv"):
            if file.is_file():
                digest.update(file.name.encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def mapped_head(head: tuple[float, ...], threshold: float, band: float, target_threshold: float,
                target_band: float) -> tuple[npt.NDArray[np.float64], float]:
    """(weights, bias) whose sigmoid puts ``threshold`` at ``target_threshold`` and the band's lower edge
    (``band`` logits below) at ``target_band`` logits below it: the config's operating point fits as is."""
    from device.liveness.passive import logit

    gain = target_band / band if band > 1e-6 and target_band > 0 else 1.0
    weights = np.asarray(head[:-1], np.float64) * gain
    bias = gain * (head[-1] - logit(threshold)) + logit(target_threshold)
    return weights, float(bias)


def export_head(weights: npt.NDArray[np.float64], bias: float, dest: Path) -> None:
    """Write the linear head as a float32 ``(1, C)`` -> ``(1, 1)`` sigmoid ``.tflite``."""
    from models.convert.export import ExportError, _tf, export_float32

    tf = _tf()
    width = int(weights.size)
    model = tf.keras.Sequential([tf.keras.Input((width,), name="features"),
                                 tf.keras.layers.Dense(1, activation="sigmoid", name="genuine")])
    model.layers[-1].set_weights([weights.reshape(width, 1).astype(np.float32),
                                  np.array([bias], np.float32)])
    try:
        atomic_write_bytes(dest, export_float32(model))
    except ExportError as exc:
        raise LivenessTrainingError(str(exc)) from exc


def head_parity(head_path: Path, features: npt.NDArray[np.float32], weights: npt.NDArray[np.float64],
                bias: float) -> float:
    """Largest |TFLite head - numpy head| genuine probability over the rows of ``features``."""
    from models.runtime.interpreter import TFLiteModel

    worst = 0.0
    with TFLiteModel(head_path) as model:
        for row in features:
            got = float(model.run(row.reshape(1, -1)).reshape(-1)[0])
            z = float(np.asarray(row, np.float64) @ weights + bias)
            worst = max(worst, abs(got - 1.0 / (1.0 + math.exp(-min(max(z, -80.0), 80.0)))))
    return worst


def _load_sets(labels_csvs: tuple[Path, ...], models_dir: Path | None, minifasnet_dir: Path | None,
               features_model: Path, progress: bool, cache_dir: Path | None) -> list[Any]:
    from dataclasses import replace

    from device.liveness.trained import DEFAULT_SCALE
    from server.evaluation.liveness import frame_features, load_labels
    from server.evaluation.liveness_calibrate import load_set

    sets = []
    for path in labels_csvs:
        base = load_set(path, models_dir, minifasnet_dir, progress=progress, cache_dir=cache_dir)
        features = frame_features(load_labels(path), path.parent, models_dir, features_model, DEFAULT_SCALE,
                                  progress=progress)
        sets.append(replace(base, features=features))
    if len({c.name for c in sets}) != len(sets):
        raise LivenessTrainingError("each labels CSV must sit in its own folder (the folder names the set)")
    return sets


def train_liveness(labels_csvs: tuple[Path, ...], report_dir: Path, models_dir: Path | None = None,
                   minifasnet_dir: Path | None = None, budget: float | None = None,
                   band_budget: float | None = None, folds: int | None = None, progress: bool = True,
                   cache_dir: Path | None = None) -> dict[str, Any]:
    """The whole run of the module doc; returns (and writes) ``metrics.json``."""
    from device.config import LivenessConfig
    from device.liveness.passive import PassiveModelError, resolve_minifasnet_files
    from models.convert.liveness_features import FeatureVariantError, with_feature_output
    from server.evaluation.liveness import LivenessEvalError, accept, default_models
    from server.evaluation.liveness_calibrate import (
        DEFAULT_BAND_BUDGET,
        DEFAULT_BUDGET,
        DEFAULT_FOLDS,
        TRAINED,
        TRAINED_L2,
        calibrate,
        fit_scorer,
        linear_scores,
        rates_dict,
    )

    budget = DEFAULT_BUDGET if budget is None else budget
    band_budget = DEFAULT_BAND_BUDGET if band_budget is None else band_budget
    folds = DEFAULT_FOLDS if folds is None else folds
    if not labels_csvs:
        raise LivenessTrainingError("give at least one labelled set (--labels)")
    export = report_dir / EXPORT_SUBDIR
    export.mkdir(parents=True, exist_ok=True)
    models_dir = default_models(models_dir, minifasnet_dir)
    try:
        base = dict((spec.manifest_name, path) for spec, path in
                    resolve_minifasnet_files(models_dir, minifasnet_dir, names=(BASE_MODEL,)))[BASE_MODEL]
        width = with_feature_output(base, export / FEATURES_FILE)
        sets = _load_sets(labels_csvs, models_dir, minifasnet_dir, export / FEATURES_FILE, progress,
                          cache_dir)
        result = calibrate(sets, budget, band_budget, folds, trained=True)
        everything = [np.ones(c.genuine.size, bool) for c in sets]
        head, threshold, band = fit_scorer(sets, everything, TRAINED, budget, band_budget)
    except (PassiveModelError, FeatureVariantError, LivenessEvalError, KeyError) as exc:
        raise LivenessTrainingError(str(exc)) from exc
    if head is None:
        raise LivenessTrainingError("the trained head was not fitted")
    passive = LivenessConfig().passive
    weights, bias = mapped_head(head, threshold, band, passive.threshold, passive.uncertain_band)
    export_head(weights, bias, export / HEAD_FILE)
    features = np.vstack([c.features[~np.isnan(c.features).any(axis=1)] for c in sets
                          if c.features is not None])
    parity = head_parity(export / HEAD_FILE, features, weights, bias)
    if parity > PARITY_TOLERANCE:
        raise LivenessTrainingError(f"the exported head differs from the fitted one by {parity:.2e} "
                                    f"(> {PARITY_TOLERANCE})")
    in_sample = {c.name: rates_dict(accept(linear_scores(c.features, (*weights, bias)), passive.threshold), c)
                 for c in sets if c.features is not None}
    metrics: dict[str, Any] = {
        "kind": "liveness",
        "base_model": BASE_MODEL,
        "feature_width": width,
        "data_hash": data_hash(labels_csvs),
        "config": {"l2": TRAINED_L2, "budget": budget, "band_budget": band_budget, "folds": folds,
                   "sets": [c.name for c in sets]},
        "heldout": {
            "trained_on": [c.name for c in sets],
            "budget": budget,
            "baseline": BASELINE_SCORER,
            "candidate": TRAINED,
            "protocols": result["protocols"],
        },
        "final": {"fitted_threshold": threshold, "fitted_band": round(band, 4),
                  "door_threshold": passive.threshold, "door_band": passive.uncertain_band,
                  "in_sample": in_sample},
        "parity": {"max_abs_probability": parity},
        "files": {"features": FEATURES_FILE, "head": HEAD_FILE},
    }
    (report_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True), encoding="utf-8")
    logger.info("liveness head trained on %s: report in %s", ", ".join(c.name for c in sets), report_dir)
    return metrics


def summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """Per protocol and set: the candidate's and the baseline's held-out APCER, BPCER and ACER."""
    heldout = metrics["heldout"]
    out: dict[str, Any] = {}
    for protocol, by_scorer in heldout["protocols"].items():
        out[protocol] = {}
        for name in heldout["trained_on"]:
            row = {}
            for role in ("candidate", "baseline"):
                rates = by_scorer.get(heldout[role], {}).get(name)
                if rates is not None:
                    row[role] = {k: rates[k] for k in ("apcer", "bpcer", "acer", "apcer_by_kind")}
            out[protocol][name] = row
    return out
