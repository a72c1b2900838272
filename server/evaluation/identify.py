"""`facegate eval identify`: open-set 1:N identification, the job a door does.

The protocol, on a folder with one subfolder per identity (JPEG, PNG or PGM images):

- the split is stable, by a hash of the identity name (``is_enrolled``): half of the identities are
  enrolled, the others are strangers;
- an enrolled identity's first ``K`` images (natural sort order) are its templates, the rest are
  *mated* probes; every image of a stranger is a *non-mated* probe;
- each probe is searched against the whole gallery through the device's own ``Gallery`` (identity
  score = best template cosine, runner-up = the next identity); a mated probe is a hit when the top
  identity is the right one and passes the rule, a non-mated probe is a false positive when anything
  passes;
- a probe with no face found is a miss if mated and a rejection if non-mated; an enrollment image with
  no face is refused as an enrollment station would (counted in ``fail_to_detect``), and an identity
  with no usable enrollment image is not enrolled (its probes are then left out);
- ``--exclude`` leaves named identities out (known label errors: one person under two names would
  otherwise be a "stranger" who rightly matches).

Embeddings are cached on disk per pipeline (``server.evaluation.embed_cache``).

Figures: FNIR at FPIR 1e-2 and 1e-3 (the threshold alone, the DET curve) and ``at_config``: the
device's decision rule (``score >= tau`` and ``margin >= delta``) as configured, or with the defaults.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from core.types import Match
from device.config import DecisionConfig, GalleryConfig
from server.evaluation.verify import Vector

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".pgm"})
REPORT_FPIRS: tuple[str, ...] = ("0.01", "0.001")
PART_SALT = "facegate-levers-v1"
EVAL_SHA = "eval"  # the in-memory evaluation gallery is never saved; it needs no real embedder sha


class IdentifyError(Exception):
    """The identities folder or the options cannot make an open-set protocol."""


def _natural_key(name: str) -> list[Any]:
    """Sort key that puts 2.pgm before 10.pgm."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def list_identities(root: Path) -> dict[str, list[str]]:
    """Identity name -> its image paths (relative to ``root``, natural order); images only."""
    if not root.is_dir():
        raise IdentifyError(f"{root} is not a folder (give one subfolder per identity)")
    out: dict[str, list[str]] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = sorted((p.name for p in folder.iterdir()
                         if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES), key=_natural_key)
        if images:
            out[folder.name] = [f"{folder.name}/{name}" for name in images]
    if not out:
        raise IdentifyError(f"{root} has no identity subfolders with JPEG, PNG or PGM images")
    return out


def part_of(identity: str) -> str:
    """'tune' or 'report': the identity-disjoint split of the studies (salted hash, independent of
    ``is_enrolled``). Choices (tau, delta, levers) are made on 'tune' and quoted on 'report'."""
    digest = hashlib.sha256(f"{PART_SALT}:{identity}".encode()).digest()
    return "tune" if digest[0] % 2 == 0 else "report"


def is_enrolled(identity: str) -> bool:
    """The stable split: an identity is enrolled when the first byte of sha256(name) is even."""
    return hashlib.sha256(identity.encode("utf-8")).digest()[0] % 2 == 0


@dataclass(frozen=True, slots=True)
class Split:
    """Who enrolls with which images, and the mated / non-mated probes as (identity, path)."""

    enroll: dict[str, list[str]]
    mated: list[tuple[str, str]]
    nonmated: list[tuple[str, str]]

    @property
    def paths(self) -> list[str]:
        """Every image the protocol uses."""
        return [p for images in self.enroll.values() for p in images] + \
            [p for _, p in self.mated] + [p for _, p in self.nonmated]


def split_identities(identities: dict[str, list[str]], enroll_per_person: int) -> Split:
    """The protocol's roles: hash-enrolled identities enroll their first K images."""
    if enroll_per_person < 1:
        raise IdentifyError("--enroll-per-person must be at least 1")
    chosen = {name for name in identities if is_enrolled(name)}
    enroll: dict[str, list[str]] = {}
    mated: list[tuple[str, str]] = []
    nonmated: list[tuple[str, str]] = []
    for name, images in identities.items():
        if name in chosen:
            enroll[name] = images[:enroll_per_person]
            mated += [(name, p) for p in images[enroll_per_person:]]
        else:
            nonmated += [(name, p) for p in images]
    if not enroll or not nonmated:
        raise IdentifyError(f"the split left {len(enroll)} enrolled and {len(identities) - len(enroll)} "
                            "stranger identities: an open-set protocol needs both (add identities)")
    if not mated:
        raise IdentifyError(f"no enrolled identity has more than {enroll_per_person} images: no mated probes")
    return Split(enroll, mated, nonmated)


@dataclass(frozen=True, slots=True)
class Searches:
    """Each probe's top identity score, runner-up score and, for mated probes, whether it is right.

    A probe without a face scores -inf (never accepted). ``enrolled`` counts persons with a template;
    ``nonmated_ids`` names each stranger probe's identity (for resampling strangers by identity).
    """

    mated_score: npt.NDArray[np.float64]
    mated_runner_up: npt.NDArray[np.float64]
    mated_correct: npt.NDArray[np.bool_]
    nonmated_score: npt.NDArray[np.float64]
    nonmated_runner_up: npt.NDArray[np.float64]
    enrolled: int
    nonmated_ids: npt.NDArray[np.str_] | None = None


def enroll_templates(split: Split, vectors: dict[str, Vector | None]) -> dict[str, Vector]:
    """(K, d) templates per identity from the enrollment images that have a face."""
    out: dict[str, Vector] = {}
    for name, images in split.enroll.items():
        found = [v for v in (vectors.get(p) for p in images) if v is not None]
        if found:
            out[name] = np.stack(found).astype(np.float32)
        else:
            logger.warning("an enrolled identity has no enrollment image with a face: not enrolled")
    if not out:
        raise IdentifyError("no enrollment image had a face: nothing could be enrolled")
    return out


def _search(gallery_cfg: GalleryConfig, templates: dict[str, Vector],
            probes: list[Vector | None]) -> list[Match | None]:
    """The device gallery's answer for each probe (None where the probe has no face)."""
    from device.gallery import Gallery

    dim = next(iter(templates.values())).shape[1]
    with Gallery.create(Path(os.devnull), dim, EVAL_SHA, gallery_cfg) as gallery:
        gallery.add_many((name, name, vecs) for name, vecs in templates.items())
        present = [(i, v) for i, v in enumerate(probes) if v is not None]
        rows = [i for i, _ in present]
        found = gallery.search_many(np.stack([v for _, v in present])) if present else []
    out: list[Match | None] = [None] * len(probes)
    for i, match in zip(rows, found, strict=True):
        out[i] = match
    return out


def search_split(split: Split, vectors: dict[str, Vector | None],
                 gallery_cfg: GalleryConfig | None = None) -> Searches:
    """Enroll, then search every probe (mated probes of a person who could not enroll are left out)."""
    templates = enroll_templates(split, vectors)
    mated = [(name, p) for name, p in split.mated if name in templates]
    cfg = gallery_cfg if gallery_cfg is not None else GalleryConfig()
    m = _search(cfg, templates, [vectors.get(p) for _, p in mated])
    n = _search(cfg, templates, [vectors.get(p) for _, p in split.nonmated])

    def scores(matches: list[Match | None]) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        top = np.array([mt.score if mt is not None else -np.inf for mt in matches], np.float64)
        runner = np.array([mt.runner_up_score if mt is not None else -np.inf for mt in matches], np.float64)
        return top, runner

    m_top, m_runner = scores(m)
    n_top, n_runner = scores(n)
    correct = np.array([mt is not None and mt.person_id == name
                        for mt, (name, _) in zip(m, mated, strict=True)], bool)
    return Searches(m_top, m_runner, correct, n_top, n_runner, len(templates),
                    np.array([name for name, _ in split.nonmated]))


def det_curve(searches: Searches) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64],
                                           npt.NDArray[np.float64]]:
    """(fpir, fnir, thresholds) accepting ``score >= threshold``, one point per distinct finite score."""
    both = np.concatenate([searches.mated_score, searches.nonmated_score])
    thresholds = np.unique(both[np.isfinite(both)])[::-1]
    nm = np.sort(searches.nonmated_score)
    hits = np.sort(searches.mated_score[searches.mated_correct])
    fpir = (nm.size - np.searchsorted(nm, thresholds, side="left")) / max(nm.size, 1)
    mated = max(searches.mated_score.size, 1)
    fnir = 1.0 - (hits.size - np.searchsorted(hits, thresholds, side="left")) / mated
    return fpir, fnir, thresholds


def tau_at_fpir(nonmated_score: npt.NDArray[np.float64], fpir: float) -> float:
    """Lowest tau with FPIR(score >= tau) <= ``fpir`` on these non-mated top scores."""
    from server.evaluation.calibrate import choose_tau

    labels = np.zeros(nonmated_score.size + 1, int)
    labels[-1] = 1  # choose_tau wants both classes; a -inf genuine changes nothing
    return choose_tau(np.append(nonmated_score, -np.inf), labels, fpir)


@dataclass(frozen=True, slots=True)
class RuleRates:
    """Open-set rates of a decision rule on a set of searches."""

    tau: float
    delta: float
    fnir: float
    fpir: float
    wrong_id_rate: float

    def as_dict(self) -> dict[str, float]:
        """JSON-ready dict (the ``at_config`` contract)."""
        return {"tau": self.tau, "delta": self.delta, "fnir": self.fnir, "fpir": self.fpir,
                "wrong_id_rate": self.wrong_id_rate}


def rates(searches: Searches, tau: float, delta: float = 0.0) -> RuleRates:
    """FNIR, FPIR and wrong-identity rate of the rule ``score >= tau and margin >= delta``."""
    with np.errstate(invalid="ignore"):  # -inf - -inf (no face): NaN, never passes
        m_pass = (searches.mated_score >= tau) & (searches.mated_score - searches.mated_runner_up >= delta)
        n_pass = (searches.nonmated_score >= tau) & \
            (searches.nonmated_score - searches.nonmated_runner_up >= delta)
    mated = max(searches.mated_score.size, 1)
    return RuleRates(
        tau=tau, delta=delta,
        fnir=float(1.0 - np.sum(m_pass & searches.mated_correct) / mated),
        fpir=float(np.mean(n_pass)) if n_pass.size else 0.0,
        wrong_id_rate=float(np.sum(m_pass & ~searches.mated_correct) / mated),
    )


def fnir_at_fpir(searches: Searches, fpir: float) -> float:
    """FNIR at the lowest threshold whose FPIR does not exceed ``fpir`` (no margin)."""
    return rates(searches, tau_at_fpir(searches.nonmated_score, fpir)).fnir


def plot_det(curves: dict[str, tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]], path: Path,
             points: dict[str, tuple[float, float]] | None = None, title: str = "") -> None:
    """Write a DET plot (FNIR against FPIR, log axes) of labelled curves and operating points."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    floor = 1e-4  # zero rates are drawn on the axis floor
    fig, ax = plt.subplots(figsize=(5.2, 4.2), dpi=100)
    for label, (fpir, fnir) in curves.items():
        ax.step(np.maximum(fpir, floor), np.maximum(fnir, floor), where="post", label=label)
    for label, (fp, fn) in (points or {}).items():
        ax.plot(max(fp, floor), max(fn, floor), "o", label=label)
    for x in (1e-3, 1e-2):
        ax.axvline(x, color="0.8", lw=0.8, zorder=0)
    lowest = min([float(np.min(fnir[fnir > 0])) for _, fnir in curves.values() if np.any(fnir > 0)]
                 or [floor])
    ax.set(xscale="log", yscale="log", xlim=(floor, 1.0), ylim=(max(floor, lowest / 2), 1.0),
           xlabel="FPIR (strangers let in)", ylabel="FNIR (enrolled people refused)", title=title)
    ax.legend(fontsize=8)
    ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def decision_config(config_path: Path | None) -> tuple[DecisionConfig, GalleryConfig]:
    """The device's decision and gallery settings, or the calibrated defaults without a config."""
    from device.config import load_device_config
    from device.decide.operating_point import DEFAULT_DELTA, DEFAULT_TAU

    if config_path is None:
        return DecisionConfig(tau=DEFAULT_TAU, delta=DEFAULT_DELTA), GalleryConfig()
    cfg = load_device_config(config_path)
    return cfg.decision, cfg.gallery


def run_identify(root: Path, pipeline: str, enroll_per_person: int = 1, config_path: Path | None = None,
                 models_dir: Path | None = None, plot: Path | None = None, progress: bool = True,
                 exclude: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The whole protocol for one pipeline; returns the JSON-ready result of `eval identify`."""
    from server.evaluation.embed_cache import cached_embed_all
    from server.evaluation.verify import PIPELINES, PipelineEmbedder

    if pipeline not in PIPELINES:
        raise IdentifyError(f"unknown pipeline '{pipeline}' (known: {sorted(PIPELINES)})")
    decision, gallery_cfg = decision_config(config_path)
    identities = {n: p for n, p in list_identities(root).items() if n not in exclude}
    split = split_identities(identities, enroll_per_person)
    if pipeline == "dlib":
        embedder = PIPELINES[pipeline](models_dir=models_dir)
    else:
        from device.config import load_device_config

        detector = load_device_config(config_path).detector if config_path else None
        embedder = PipelineEmbedder("int8" if pipeline == "int8" else "float32", models_dir,
                                    detector_cfg=detector)
    try:
        vectors = cached_embed_all(embedder, root, split.paths, progress)
    finally:
        embedder.close()
    searches = search_split(split, vectors, gallery_cfg)
    at_config = rates(searches, decision.tau, decision.delta)
    result = {
        "pipeline": pipeline,
        "enrolled": searches.enrolled,
        "mated": int(searches.mated_score.size),
        "nonmated": int(searches.nonmated_score.size),
        "fail_to_detect": sum(v is None for v in vectors.values()),
        "fnir_at_fpir": {key: fnir_at_fpir(searches, float(key)) for key in REPORT_FPIRS},
        "at_config": at_config.as_dict(),
    }
    logger.info("%s: %d enrolled, %d mated, %d non-mated probes", pipeline, result["enrolled"],
                result["mated"], result["nonmated"])
    if plot is not None:
        fpir, fnir, _ = det_curve(searches)
        plot_det({pipeline: (fpir, fnir)}, plot,
                 {f"at config (tau {decision.tau:.3f}, delta {decision.delta:.3f})": (at_config.fpir,
                                                                                      at_config.fnir)},
                 title=f"{root.name}: {result['enrolled']} enrolled, K={enroll_per_person}")
    return result
