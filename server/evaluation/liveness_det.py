"""DET curves for liveness: APCER against BPCER on normal-deviate axes (ISO/IEC 30107-3), as a PNG.

One curve per dataset, and per attack kind when kinds are known; the operating point (the threshold used)
is marked on each curve. A frame without a face (NaN score) is never accepted, whatever the threshold.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from statistics import NormalDist

import numpy as np
import numpy.typing as npt

# Rates are clipped to [eps, 1 - eps] before the probit so 0 and 1 stay on the plot.
DET_EPS = 1e-3
DET_TICKS = (0.001, 0.01, 0.05, 0.2, 0.5, 0.8, 0.95)

Curve = tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]


def det_points(scores: npt.ArrayLike, genuine: npt.ArrayLike) -> Curve:
    """(bpcer, apcer) at every distinct score used as the threshold (accept score >= threshold)."""
    s = np.asarray(scores, np.float64)
    g = np.asarray(genuine, bool)
    finite = np.unique(s[~np.isnan(s)])
    cand = np.concatenate([finite, [np.inf]])
    gen = np.sort(np.where(np.isnan(s[g]), -np.inf, s[g]))
    att = np.sort(np.where(np.isnan(s[~g]), -np.inf, s[~g]))
    bpcer = np.searchsorted(gen, cand, side="left") / max(gen.size, 1)
    apcer = (att.size - np.searchsorted(att, cand, side="left")) / max(att.size, 1)
    return bpcer.astype(np.float64), apcer.astype(np.float64)


def _probit(rates: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    inv = NormalDist().inv_cdf
    return np.array([inv(min(max(float(r), DET_EPS), 1.0 - DET_EPS)) for r in rates])


def write_det_plot(path: Path, sets: Mapping[str, tuple[npt.ArrayLike, npt.ArrayLike, list[str] | None]],
                   thresholds: Mapping[str, float]) -> None:
    """Write a DET plot of each set ``name -> (scores, genuine, kinds)`` with its threshold marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 6.0))
    for name, (scores, genuine, kinds) in sets.items():
        s = np.asarray(scores, np.float64)
        g = np.asarray(genuine, bool)
        groups: list[tuple[str, npt.NDArray[np.bool_]]] = [(name, np.ones(s.size, bool))]
        if kinds is not None:
            arr = np.asarray(kinds)
            groups += [(f"{name}: {kind}", g | (arr == kind)) for kind in sorted(set(kinds) - {"genuine"})]
        for label, keep in groups:
            bpcer, apcer = det_points(s[keep], g[keep])
            line = ax.plot(_probit(bpcer), _probit(apcer), label=label)[0]
            t = thresholds.get(name)
            if t is not None:
                sk, gk = s[keep], g[keep]
                accepted = np.where(np.isnan(sk), False, sk >= t)
                point = np.array([float((~accepted[gk]).mean()), float(accepted[~gk].mean())])
                ax.plot(*_probit(point), "o", color=line.get_color())
    ticks = _probit(np.array(DET_TICKS))
    labels = [f"{100 * t:g}%" for t in DET_TICKS]
    ax.set_xticks(ticks, labels)
    ax.set_yticks(ticks, labels)
    ax.set_xlabel("BPCER (genuine refused)")
    ax.set_ylabel("APCER (attacks accepted)")
    ax.set_title("Passive liveness DET (dots: operating threshold)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
