"""Open-set calibration: the door's tau (and margin delta) for a target FPIR at a gallery size N.

A door searches every face against the N persons enrolled, so a stranger's chance of landing above tau
grows with N. ``facegate eval calibrate --open-set --fpir 1e-3 --gallery-size N`` measures it:

1. The identities of ``--identities`` are split in two parts by a salted hash of the name
   (``identify.part_of``). The operating point is quoted by cross calibration: tau and delta chosen on
   one part are measured on the other (held-out identities), both ways, and averaged. The rule that
   ships is then chosen the same way on all identities together (more strangers, a steadier tail),
   like a 10-fold protocol reports held-out folds and deploys the threshold of all the data.
2. In a part, each of ``draws`` role draws enrolls half of the identities from one random photo; their
   other photos are mated probes, every photo of the other half is a stranger.
3. The gallery is made N persons: a random subset of the enrolled when N is smaller (the persons left
   out become strangers too), or the enrolled plus synthetic distractor identities
   (``distractors.SyntheticFaces``) when N is larger, fitted on a third of the identities set aside
   for that draw (neither enrolled nor strangers). Each probe is scored against the whole gallery
   (exact search, identity = best template).
4. Pooled over the draws, for each delta of ``DELTA_GRID``: tau is the lowest threshold whose FPIR
   (strangers passing ``score >= tau`` and ``margin >= delta``) stays within the target for
   ``CONFIDENCE`` of identity-bootstrap resamples of the strangers (``tau_bound``: at 1e-3 a few
   look-alike strangers decide it), and FNIR is measured there; the delta with the lowest FNIR is
   kept, or none when the margin buys less than ``MARGIN_MIN_GAIN``.

The score matrices here are plain numpy (exact search), which is what the device's exact index returns.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from server.evaluation.distractors import RealFaces, SyntheticFaces
from server.evaluation.identify import Searches, rates, tau_at_fpir
from server.evaluation.verify import Vector

logger = logging.getLogger(__name__)

Matrix = npt.NDArray[np.float64]
GALLERY_SIZES = (10, 100, 1_000, 10_000)
DEFAULT_DRAWS = 10
DELTA_GRID = tuple(round(float(d), 3) for d in np.arange(0.0, 0.0601, 0.005))
# 1/this of the identities is set aside as the distractor source when the gallery needs distractors.
DISTRACTOR_SOURCE_SHARE = 3
# The door's tau keeps FPIR within the target for this share of stranger populations (identity
# bootstrap): the tune part's few look-alikes must not set it alone. 0 = the sample's own tau.
CONFIDENCE = 0.9
BOOTSTRAP = 200
# With a margin, tau alone must still hold FPIR within this many times the target.
MARGIN_TAU_FLOOR_FACTOR = 10.0
# Fewer identities per part cannot give a stranger set worth a tau.
MIN_PART_IDENTITIES = 6
# A margin is kept only when it lowers FNIR at the target FPIR by at least this much (absolute):
# below that the difference is within the draw-to-draw noise and the simpler rule wins.
MARGIN_MIN_GAIN = 0.005


# ----------------------------------------------------------------------------- roles and scores
@dataclass(frozen=True, slots=True)
class Draw:
    """One assignment of roles: enrollment images per identity, mated and non-mated probes."""

    enroll: dict[str, list[str]]
    mated: list[tuple[str, str]]
    nonmated: list[tuple[str, str]]


def random_draw(identities: dict[str, list[str]], k: int, rng: np.random.Generator) -> Draw:
    """Half of the identities enroll K random images each; the rest of theirs are mated probes."""
    names = sorted(identities)
    chosen = set(rng.permutation(names)[: len(names) // 2].tolist())
    enroll: dict[str, list[str]] = {}
    mated: list[tuple[str, str]] = []
    nonmated: list[tuple[str, str]] = []
    for name in names:
        images = list(identities[name])
        if name in chosen:
            order = rng.permutation(len(images))
            enroll[name] = [images[i] for i in order[:k]]
            mated += [(name, images[i]) for i in order[k:]]
        else:
            nonmated += [(name, p) for p in images]
    return Draw(enroll, mated, nonmated)


def shrink(draw: Draw, persons: int, rng: np.random.Generator) -> Draw:
    """Keep ``persons`` random enrolled identities; the others' photos all become strangers."""
    names = sorted(draw.enroll)
    if persons >= len(names):
        return draw
    keep = set(rng.permutation(names)[:persons].tolist())
    strangers = [(n, p) for n in names if n not in keep for p in draw.enroll[n]]
    strangers += [(n, p) for n, p in draw.mated if n not in keep]
    return Draw({n: draw.enroll[n] for n in names if n in keep},
                [(n, p) for n, p in draw.mated if n in keep], draw.nonmated + strangers)


def stack(paths: Sequence[str], vectors: dict[str, Vector | None],
          dim: int) -> tuple[Matrix, npt.NDArray[np.bool_]]:
    """(len(paths), dim) vectors and a found mask (zero rows where no face was found)."""
    out = np.zeros((len(paths), dim))
    found = np.zeros(len(paths), bool)
    for i, p in enumerate(paths):
        v = vectors.get(p)
        if v is not None:
            out[i], found[i] = v, True
    return out, found


@dataclass(frozen=True, slots=True)
class Scored:
    """Identity score matrices of one draw: (probes, gallery identities); -inf rows where no face."""

    names: list[str]
    mated: Matrix
    mated_truth: npt.NDArray[np.int64]
    nonmated: Matrix
    templates: list[Matrix]
    nonmated_ids: npt.NDArray[np.str_]


def score_draw(draw: Draw, vectors: dict[str, Vector | None], how: str = "max",
               distractors: Matrix | None = None) -> Scored:
    """Cosine of each probe with each gallery identity: best template, mean template or mean score.

    ``distractors`` (one unit vector per synthetic person) are appended to the gallery.
    """
    dim = len(next(v for v in vectors.values() if v is not None))
    templates: list[Matrix] = []
    names: list[str] = []
    for name, images in draw.enroll.items():
        t, found = stack(images, vectors, dim)
        if found.any():
            names.append(name)
            templates.append(t[found])
    index = {n: i for i, n in enumerate(names)}
    if how == "mean":
        means = np.stack([t.mean(axis=0) for t in templates])
        means /= np.linalg.norm(means, axis=1, keepdims=True)

    def matrix(probes: Matrix, found: npt.NDArray[np.bool_]) -> Matrix:
        if how == "mean":
            s = probes @ means.T
        elif how == "mean-score":
            s = np.stack([(probes @ t.T).mean(axis=1) for t in templates], axis=1)
        else:
            s = np.stack([(probes @ t.T).max(axis=1) for t in templates], axis=1)
        if distractors is not None and len(distractors):
            s = np.hstack([s, probes @ distractors.T])
        s[~found] = -np.inf
        out: Matrix = s
        return out

    mated = [(n, p) for n, p in draw.mated if n in index]
    m_probes, m_found = stack([p for _, p in mated], vectors, dim)
    n_probes, n_found = stack([p for _, p in draw.nonmated], vectors, dim)
    extra = [f"synthetic-{i}" for i in range(0 if distractors is None else len(distractors))]
    return Scored([*names, *extra], matrix(m_probes, m_found),
                  np.array([index[n] for n, _ in mated], np.int64), matrix(n_probes, n_found), templates,
                  np.array([n for n, _ in draw.nonmated]))


def _top2(s: Matrix) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """(best column, best score, runner-up score) per row; the runner-up is -1 with one column."""
    if s.shape[1] < 2:
        return np.zeros(len(s), np.int64), s[:, 0], np.full(len(s), -1.0)
    part = np.argpartition(-s, 1, axis=1)[:, :2]
    first = np.take_along_axis(s, part, axis=1)
    best = np.where(first[:, 1] > first[:, 0], part[:, 1], part[:, 0])
    return best, np.max(first, axis=1), np.min(first, axis=1)


def searches_of(scored: Scored, m: Matrix | None = None, n: Matrix | None = None) -> Searches:
    """Top-1 / runner-up per probe from (possibly transformed) identity score matrices."""
    mb, ms, mr = _top2(scored.mated if m is None else m)
    _, ns, nr = _top2(scored.nonmated if n is None else n)
    fm, fn = np.isfinite(ms), np.isfinite(ns)
    return Searches(np.where(fm, ms, -np.inf), np.where(fm, mr, -np.inf), (mb == scored.mated_truth) & fm,
                    np.where(fn, ns, -np.inf), np.where(fn, nr, -np.inf), len(scored.names),
                    scored.nonmated_ids)


def pool(parts: Sequence[Searches]) -> Searches:
    """Several draws' searches as one set (rates over all their probes)."""
    ids = [p.nonmated_ids for p in parts]

    def joined(field: str) -> npt.NDArray[Any]:
        out: npt.NDArray[Any] = np.concatenate([getattr(p, field) for p in parts])
        return out

    return Searches(joined("mated_score"), joined("mated_runner_up"), joined("mated_correct"),
                    joined("nonmated_score"), joined("nonmated_runner_up"),
                    enrolled=int(np.mean([p.enrolled for p in parts])),
                    nonmated_ids=None if any(i is None for i in ids) else np.concatenate(
                        [i for i in ids if i is not None]))


# ----------------------------------------------------------------------------- calibration
def synthetic_source(vectors: dict[str, Vector | None], identities: dict[str, list[str]],
                     seed: int) -> SyntheticFaces:
    """A distractor generator fitted on the embeddings of these identities."""
    rows, labels = [], []
    for label, name in enumerate(sorted(identities)):
        for p in identities[name]:
            v = vectors.get(p)
            if v is not None:
                rows.append(v)
                labels.append(label)
    real = RealFaces(np.stack(rows).astype(np.float32), np.asarray(labels, np.int64), "identities")
    return SyntheticFaces(real, seed)


def gallery_searches(vectors: dict[str, Vector | None], identities: dict[str, list[str]], size: int,
                     draws: int, seed: int, how: str = "max") -> Searches:
    """Pooled one-shot searches of ``draws`` role draws, the gallery made ``size`` persons.

    When the enrolled half is smaller than ``size``, a third of the identities (drawn anew each time)
    is set aside as the distractor source: distractors fitted on the strangers' own photos would be
    near-copies of them, and fitted on the enrolled ones near-copies of those, overstating FPIR or
    wrong identifications.
    """
    rng = np.random.default_rng(seed)
    names = sorted(identities)
    out = []
    for r in range(draws):
        source: set[str] = set()
        if size > len(names) // 2:
            source = set(rng.permutation(names)[: len(names) // DISTRACTOR_SOURCE_SHARE].tolist())
        roles = {n: identities[n] for n in names if n not in source}
        draw = shrink(random_draw(roles, 1, rng), size, rng)
        extra = size - len(draw.enroll)
        distractors = None
        if extra > 0:
            synth = synthetic_source(vectors, {n: identities[n] for n in source}, seed + r)
            distractors = synth.photos(synth.centres(extra)).astype(np.float64)
        out.append(searches_of(score_draw(draw, vectors, how, distractors)))
    return pool(out)


@dataclass(frozen=True, slots=True)
class OperatingRow:
    """A calibrated (tau, delta) for a gallery size, its in-sample rates and its held-out estimate.

    ``heldout`` is the mean over the two folds of the cross calibration (rule chosen on one part,
    rates measured on the other); ``folds`` has each direction.
    """

    gallery_size: int
    tau: float
    delta: float
    fnir: float
    fpir: float
    heldout: dict[str, float]
    folds: list[dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {"gallery_size": self.gallery_size, "tau": self.tau, "delta": self.delta, "fnir": self.fnir,
                "fpir": self.fpir, "heldout": self.heldout, "folds": self.folds}


def tau_bound(nonmated: npt.NDArray[np.float64], ids: npt.NDArray[np.str_] | None, fpir: float,
              confidence: float = CONFIDENCE, seed: int = 0) -> float:
    """tau whose FPIR stays within ``fpir`` for a ``confidence`` share of stranger populations.

    A handful of look-alike strangers decides FPIR at 1e-3, so the strangers are resampled *by
    identity* (bootstrap, ``BOOTSTRAP`` times) and the ``confidence`` quantile of the taus is kept;
    never below the tau of the sample itself. Without identities, the sample's tau.
    """
    plain = tau_at_fpir(nonmated, fpir)
    if ids is None or confidence <= 0.0:
        return plain
    rng = np.random.default_rng(seed)
    names, inverse = np.unique(ids, return_inverse=True)
    groups = [np.flatnonzero(inverse == g) for g in range(len(names))]
    taus = []
    for _ in range(BOOTSTRAP):
        pick = rng.integers(0, len(groups), len(groups))
        taus.append(tau_at_fpir(nonmated[np.concatenate([groups[g] for g in pick])], fpir))
    return max(plain, float(np.quantile(taus, confidence)))


def choose_rule(searches: Searches, fpir: float, deltas: Sequence[float] = DELTA_GRID,
                confidence: float = 0.0) -> tuple[float, float]:
    """(tau, delta) with the lowest FNIR at ``fpir``; delta 0 unless the margin gains MARGIN_MIN_GAIN.

    With ``confidence`` > 0, each tau is the identity-bootstrap bound of ``tau_bound``. With a margin,
    tau alone must still keep FPIR within ``MARGIN_TAU_FLOOR_FACTOR`` times the target: the margin is
    a guard on top of the threshold, never the only one (it shrinks for everyone as N grows).
    """
    results = []
    floor = tau_at_fpir(searches.nonmated_score, min(1.0, MARGIN_TAU_FLOOR_FACTOR * fpir))
    for delta in deltas:
        with np.errstate(invalid="ignore"):
            margin_ok = searches.nonmated_score - searches.nonmated_runner_up >= delta
        tau = tau_bound(np.where(margin_ok, searches.nonmated_score, -np.inf), searches.nonmated_ids, fpir,
                        confidence)
        tau = max(tau, floor) if delta > 0 else tau
        results.append((rates(searches, tau, delta).fnir, tau, delta))
    plain = next(r for r in results if r[2] == 0.0)
    best = min(results, key=lambda r: (r[0], r[2]))
    chosen = best if plain[0] - best[0] >= MARGIN_MIN_GAIN else plain
    return chosen[1], chosen[2]


def _rounded_up(tau: float) -> float:
    """tau rounded up to 4 decimals (the config's precision; never lower than measured)."""
    return float(np.ceil(tau * 1e4) / 1e4) if tau > -1.0 else -1.0


Part = tuple[dict[str, Vector | None], dict[str, list[str]]]


def calibrate_sizes(parts: dict[str, Part], sizes: Sequence[int], fpir: float, draws: int = DEFAULT_DRAWS,
                    seed: int = 0, how: str = "max", confidence: float = CONFIDENCE) -> list[OperatingRow]:
    """One row per gallery size: the rule chosen on all parts together (what ships), and its held-out
    estimate by cross calibration (chosen on each part, measured on the other)."""
    names = sorted(parts)
    vectors = {k: v for part in parts.values() for k, v in part[0].items()}
    union: Part = (vectors, {n: p for part in parts.values() for n, p in part[1].items()})
    rows = []
    for size in sizes:
        searched = {name: gallery_searches(*parts[name], size, draws, seed, how) for name in names}
        folds = []
        for chosen_on in names:
            tau, delta = choose_rule(searched[chosen_on], fpir, confidence=confidence)
            tau = _rounded_up(tau)
            for other in (n for n in names if n != chosen_on):
                r = rates(searched[other], tau, delta)
                folds.append({"chosen_on": chosen_on, "measured_on": other, "tau": tau, "delta": delta,
                              "fnir": round(r.fnir, 4), "fpir": round(r.fpir, 5),
                              "wrong_id_rate": round(r.wrong_id_rate, 5)})
        everything = gallery_searches(*union, size, draws, seed, how)
        tau, delta = choose_rule(everything, fpir, confidence=confidence)
        tau = _rounded_up(tau)
        at = rates(everything, tau, delta)
        heldout = {key: round(float(np.mean([f[key] for f in folds])), 5)
                   for key in ("fnir", "fpir", "wrong_id_rate")} if folds else {}
        rows.append(OperatingRow(size, tau, delta, round(at.fnir, 4), round(at.fpir, 5), heldout, folds))
        logger.info("N=%d: tau %.4f delta %.3f: FNIR %.4f FPIR %.5f (all identities); held-out %s", size, tau,
                    delta, at.fnir, at.fpir, heldout)
    return rows


def run_open_set(root: Path, fpir: float, sizes: Sequence[int], pipeline: str = "int8",
                 models_dir: Path | None = None, draws: int = DEFAULT_DRAWS,
                 exclude: frozenset[str] = frozenset(),
                 seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """`eval calibrate --open-set`: embed (cached), split tune/report, calibrate each gallery size."""
    from server.evaluation.embed_cache import cached_embed_all
    from server.evaluation.identify import IdentifyError, list_identities, part_of
    from server.evaluation.verify import PipelineEmbedder

    identities = {n: p for n, p in list_identities(root).items() if n not in exclude}
    parts = {part: {n: p for n, p in identities.items() if part_of(n) == part} for part in ("tune", "report")}
    for part, members in parts.items():
        if len(members) < MIN_PART_IDENTITIES:
            raise IdentifyError(f"the {part} part has {len(members)} identities; open-set calibration needs "
                                f"at least {MIN_PART_IDENTITIES} in each part (add identities)")
    embedder = PipelineEmbedder("int8" if pipeline == "int8" else "float32", models_dir)
    try:
        vectors = cached_embed_all(embedder, root, [p for images in identities.values() for p in images],
                                   progress)
    finally:
        embedder.close()
    rows = calibrate_sizes({part: (vectors, members) for part, members in parts.items()}, sizes, fpir,
                           draws, seed)
    return {"fpir": fpir, "pipeline": pipeline, "draws": draws,
            "identities": {part: len(members) for part, members in parts.items()},
            "rows": [row.as_dict() for row in rows]}
