"""The training report folder: loss and active-triplet curves, ROC and DET plots, and metrics JSON."""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import numpy.typing as npt

from core.files import atomic_write_bytes
from server.evaluation.metrics import roc_curve

logger = logging.getLogger(__name__)

# DET axes are probit-scaled; rates are clipped to [DET_MIN, 1 - DET_MIN] so 0 and 1 stay on the plot.
DET_MIN = 1e-4
DET_RANGE = (5e-4, 0.7)  # rates shown on both DET axes (1e-3 is the gate's operating point)
ROC_MIN_FAR = 1e-4  # left edge of the log-FAR ROC plot
FIG_DPI = 100


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_history(path: Path) -> dict[str, list[float]]:
    """Columns of a Keras CSVLogger file as float lists (empty dict when absent)."""
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return {}
    return {key: [v for v in (_number(r.get(key)) for r in rows) if v is not None] for key in rows[0]}


def _number(text: str | None) -> float | None:
    """A CSV cell as float; None for empty or 'NA' (CSVLogger's missing value)."""
    try:
        return float(text) if text not in (None, "", "NA") else None
    except ValueError:
        return None


def _save(fig: Any, path: Path) -> Path:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=FIG_DPI, bbox_inches="tight")
    _pyplot().close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def plot_curves(history: Mapping[str, Sequence[float]], keys: Sequence[str], title: str, ylabel: str,
                path: Path) -> Path | None:
    """Line plot of the given history columns against epoch; None when none of them is present."""
    present = [k for k in keys if history.get(k)]
    if not present:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for key in present:
        values = history[key]
        ax.plot(range(1, len(values) + 1), values, marker="o", label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_roc(curves: Mapping[str, tuple[npt.ArrayLike, npt.ArrayLike]], path: Path) -> Path:
    """ROC (TAR against log FAR) of one or more scorers: {name: (scores, labels)}."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, (scores, labels) in curves.items():
        far, tar, _ = roc_curve(scores, labels)
        ax.plot(np.maximum(far, ROC_MIN_FAR), tar, label=name)
    ax.set_xscale("log")
    ax.set_xlim(ROC_MIN_FAR, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.axvline(1e-3, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.set_title("ROC, held-out folds")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right")
    return _save(fig, path)


def _probit(rate: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    inv = NormalDist().inv_cdf
    clipped = np.clip(rate, DET_MIN, 1.0 - DET_MIN)
    return np.array([inv(float(r)) for r in clipped])


def plot_det(curves: Mapping[str, tuple[npt.ArrayLike, npt.ArrayLike]], path: Path) -> Path:
    """DET (miss rate against false accept rate, both on normal-deviate axes)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, (scores, labels) in curves.items():
        far, tar, _ = roc_curve(scores, labels)
        ax.plot(_probit(far), _probit(1.0 - tar), label=name)
    ticks = np.array([1e-3, 1e-2, 0.1, 0.5])
    ax.set_xticks(_probit(ticks), [f"{t:g}" for t in ticks])
    ax.set_yticks(_probit(ticks), [f"{t:g}" for t in ticks])
    limits = _probit(np.array(DET_RANGE))
    ax.set_xlim(*limits)
    ax.set_ylim(*limits)
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("false reject rate")
    ax.set_title("DET, held-out folds")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    return _save(fig, path)


def write_json(path: Path, payload: Mapping[str, Any]) -> Path:
    """Pretty JSON written atomically."""
    atomic_write_bytes(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    return path


def write_report(folder: Path, history: Mapping[str, Sequence[float]],
                 curves: Mapping[str, tuple[npt.ArrayLike, npt.ArrayLike]],
                 metrics: Mapping[str, Any]) -> list[Path]:
    """Every plot that has data plus ``metrics.json``; returns the files written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = [p for p in (
        plot_curves(history, ["loss", "val_loss"], "triplet loss", "loss", folder / "loss.png"),
        plot_curves(history, ["active_fraction", "active_all_fraction", "val_active_fraction",
                     "val_active_all_fraction"],
                    "active (non-zero) triplets", "fraction", folder / "active_triplets.png"),
    ) if p is not None]
    if curves:
        written += [plot_roc(curves, folder / "roc.png"), plot_det(curves, folder / "det.png")]
    written.append(write_json(folder / "metrics.json", metrics))
    logger.info("report written to %s (%d files)", folder, len(written))
    return written
