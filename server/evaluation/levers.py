"""Which levers make one-shot open-set identification better? A study on an identity-disjoint split.

``python -m server.evaluation.levers --identities DIR`` keeps the identities of one part of the
salted-hash split (``identify.part_of``): levers are chosen on ``--part tune`` and quoted on
``--part report``, never the other way round. Inside a part, ``--draws`` random role draws (which half
of the identities enrolls, which of their photos enrolls) give the mean and sd of FNIR at FPIR 1e-2 /
1e-3, so that a lever's effect is not the luck of one split; ``--plot`` draws the DET of each variant
on the `eval identify` split of the part.

Levers (each against the same baseline, int8 one-shot, identity score = best template):

- embedding (``VARIANTS``): horizontal-flip fusion (``+flip``), the alignment (``-keypoints`` vs the
  face mesh), float32, and the dlib reference (dlib's own 5-point chip with the same network);
- multi-template enrollment (K=3): best template (``max``), mean template (``mean``), mean score;
- score normalisation against a cohort: the gallery itself (T-norm over the probe's runner-up
  identities, Z-norm of each template against the other templates, S-norm) or, as a bound a door
  cannot ship, an external cohort of stranger photos (a third of the identities set aside);
- the runner-up margin delta (``openset.choose_rule`` at FPIR 1e-3);
- track-level fusion at the door (``--track-variants``, ``server.evaluation.tracks``).

Identities named with ``--drop`` are left out (label errors, e.g. one person under two identity ids).
Embeddings come from the evaluation cache, so each variant embeds each image once.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from server.evaluation.identify import (
    REPORT_FPIRS,
    Searches,
    det_curve,
    list_identities,
    part_of,
    plot_det,
    rates,
    search_split,
    split_identities,
    tau_at_fpir,
)
from server.evaluation.openset import Scored, choose_rule, random_draw, score_draw, searches_of, stack
from server.evaluation.verify import ImageEmbedder, Vector

logger = logging.getLogger(__name__)

DEFAULT_DRAWS = 20
MULTI_K = 3  # photos per person for the multi-template lever
# Cohort size for the gallery T-/Z-norm: the runner-up identities whose scores give the statistics
# (more is steadier but needs a larger gallery; FAISS's top_k is 10 on the door).
COHORT_K = 8
EXTERNAL_COHORT_K = 20  # top cohort scores for the external S-norm (5-200 all measured worse than none)
Matrix = npt.NDArray[np.float64]


# ----------------------------------------------------------------------------- embeddings
VARIANTS: dict[str, dict[str, Any]] = {
    "int8": {"pipeline": "int8", "flip": False, "align": "mesh"},
    "int8+flip": {"pipeline": "int8", "flip": True, "align": "mesh"},
    "int8-keypoints": {"pipeline": "int8", "flip": False, "align": "keypoints"},
    "float": {"pipeline": "float32", "flip": False, "align": "mesh"},
    "float+flip": {"pipeline": "float32", "flip": True, "align": "mesh"},
    "dlib": {"pipeline": "dlib"},
}


def make_embedder(variant: str, models_dir: Path | None) -> ImageEmbedder:
    """The image embedder of a study variant."""
    from server.evaluation.verify import DlibReference, PipelineEmbedder

    spec = VARIANTS[variant]
    if spec["pipeline"] == "dlib":
        return DlibReference()
    return PipelineEmbedder(spec["pipeline"], models_dir, align_method=spec["align"],
                            flip_fusion=spec["flip"])


def embed_variant(variant: str, root: Path, paths: list[str], models_dir: Path | None,
                  progress: bool = True) -> dict[str, Vector | None]:
    """Cached embeddings of ``paths`` by one variant."""
    from server.evaluation.embed_cache import cached_embed_all

    embedder = make_embedder(variant, models_dir)
    try:
        return cached_embed_all(embedder, root, paths, progress)
    finally:
        embedder.close()


# ----------------------------------------------------------------------------- normalisations
def _cohort_stats(s: Matrix, k: int, skip: int) -> tuple[Matrix, Matrix]:
    """Mean and sd of each row's ranks skip..skip+k (descending), as columns."""
    finite = np.where(np.isfinite(s), s, -1.0)
    top = -np.sort(-finite, axis=1)[:, skip:skip + k]
    mu = top.mean(axis=1, keepdims=True)
    sd = np.maximum(top.std(axis=1, keepdims=True), 1e-3)
    return mu, sd


def tnorm(scored: Scored, s: Matrix, k: int = COHORT_K) -> Matrix:
    """Probe-side normalisation with the gallery as cohort: (s - mu) / sd of the runner-up identities."""
    mu, sd = _cohort_stats(s, k, skip=1)
    out: Matrix = (s - mu) / sd
    return out


def template_stats(scored: Scored, k: int = COHORT_K) -> tuple[Matrix, Matrix]:
    """Each enrolled identity's (mu, sd) against the other identities' templates (its Z-norm cohort)."""
    first = np.stack([t[0] for t in scored.templates])
    g = first @ first.T
    np.fill_diagonal(g, -np.inf)
    mu, sd = _cohort_stats(g, k, skip=0)
    return mu.T, sd.T


def znorm(scored: Scored, s: Matrix, k: int = COHORT_K) -> Matrix:
    """Template-side normalisation with the other enrolled identities as cohort."""
    mu, sd = template_stats(scored, k)
    out: Matrix = (s - mu) / sd
    return out


def snorm(scored: Scored, s: Matrix, k: int = COHORT_K) -> Matrix:
    """Symmetric normalisation: the mean of T-norm and Z-norm."""
    out: Matrix = (tnorm(scored, s, k) + znorm(scored, s, k)) / 2.0
    return out


NORMALISERS: dict[str, Callable[[Scored, Matrix], Matrix]] = {
    "tnorm": tnorm,
    "znorm": znorm,
    "snorm": snorm,
}


# ----------------------------------------------------------------------------- external cohort
def external_snorm(scored: Scored, cohort: Matrix, probes: tuple[Matrix, Matrix],
                   k: int = EXTERNAL_COHORT_K) -> tuple[Matrix, Matrix]:
    """S-norm against a fixed cohort of stranger photos (mated, non-mated matrices).

    T-norm side: the probe's top-k cohort scores; Z-norm side: each gallery template's top-k cohort
    scores. A door would have to ship such a cohort (biometric data of other people), hence the
    bound only.
    """
    first = np.stack([t[0] for t in scored.templates])
    t_top = -np.sort(-(first @ cohort.T), axis=1)[:, :k]
    t_mu, t_sd = t_top.mean(axis=1)[None, :], np.maximum(t_top.std(axis=1)[None, :], 1e-3)
    out = []
    for s, x in zip((scored.mated, scored.nonmated), probes, strict=True):
        p_top = -np.sort(-(np.nan_to_num(x) @ cohort.T), axis=1)[:, :k]
        p_mu = p_top.mean(axis=1, keepdims=True)
        p_sd = np.maximum(p_top.std(axis=1, keepdims=True), 1e-3)
        with np.errstate(invalid="ignore"):
            out.append(((s - p_mu) / p_sd + (s - t_mu) / t_sd) / 2.0)
    return out[0], out[1]


# ----------------------------------------------------------------------------- figures
def det_figures(searches: Searches) -> dict[str, float]:
    """FNIR at each reported FPIR (threshold only)."""
    return {key: rates(searches, tau_at_fpir(searches.nonmated_score, float(key))).fnir
            for key in REPORT_FPIRS}


def margin_figures(searches: Searches) -> dict[str, float]:
    """FNIR at FPIR 1e-3 with the best margin (``openset.choose_rule``), and that tau and delta."""
    tau, delta = choose_rule(searches, 1e-3)
    return {"0.001": rates(searches, tau, delta).fnir, "tau": tau, "delta": delta}


def summarise(values: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and sd over draws of each figure."""
    keys = values[0].keys()
    return {k: {"mean": round(float(np.mean([v[k] for v in values])), 4),
                "sd": round(float(np.std([v[k] for v in values])), 4)} for k in keys}


def one_shot_study(identities: dict[str, list[str]], vectors: dict[str, Vector | None], draws: int,
                   seed: int) -> dict[str, dict[str, dict[str, float]]]:
    """One-shot figures of a variant: plain, with the margin, and with each cohort normalisation."""
    rng = np.random.default_rng(seed)
    rows: dict[str, list[dict[str, float]]] = {}
    names = sorted(identities)
    for _ in range(draws):
        draw = random_draw(identities, 1, rng)
        scored = score_draw(draw, vectors)
        base = searches_of(scored)
        rows.setdefault("one-shot", []).append(det_figures(base))
        rows.setdefault("one-shot+margin", []).append(margin_figures(base))
        for name, norm in NORMALISERS.items():
            s = searches_of(scored, norm(scored, scored.mated), norm(scored, scored.nonmated))
            rows.setdefault(f"one-shot+{name}", []).append(det_figures(s))
        # external cohort: a third of the identities set aside, the rest play the roles
        cohort_ids = set(rng.permutation(names)[: len(names) // 3].tolist())
        roles = {n: identities[n] for n in names if n not in cohort_ids}
        draw = random_draw(roles, 1, rng)
        scored = score_draw(draw, vectors)
        dim = scored.templates[0].shape[1]
        cohort, found = stack([p for n in cohort_ids for p in identities[n]], vectors, dim)
        mated = [p for n, p in draw.mated if n in set(scored.names)]
        probes = (stack(mated, vectors, cohort.shape[1])[0], stack([p for _, p in draw.nonmated], vectors,
                                                                    cohort.shape[1])[0])
        m, n = external_snorm(scored, cohort[found], probes)
        rows.setdefault("one-shot (cohort draw)", []).append(det_figures(searches_of(scored)))
        rows.setdefault("one-shot+external-snorm (cohort draw)", []).append(
            det_figures(searches_of(scored, m, n)))
    return {k: summarise(v) for k, v in rows.items()}


def multi_template_study(identities: dict[str, list[str]], vectors: dict[str, Vector | None], draws: int,
                         seed: int) -> dict[str, dict[str, dict[str, float]]]:
    """K-photo enrollment: best template, mean template, mean score (with and without the margin)."""
    rng = np.random.default_rng(seed)
    rows: dict[str, list[dict[str, float]]] = {}
    for _ in range(draws):
        draw = random_draw(identities, MULTI_K, rng)
        for how in ("max", "mean", "mean-score"):
            s = searches_of(score_draw(draw, vectors, how))
            rows.setdefault(f"K={MULTI_K} {how}", []).append({**det_figures(s),
                                                               "margin@0.001": margin_figures(s)["0.001"]})
    return {k: summarise(v) for k, v in rows.items()}


def _filtered(root: Path, part: str, dropped: set[str]) -> dict[str, list[str]]:
    return {n: p for n, p in list_identities(root).items() if part_of(n) == part and n not in dropped}


def main(argv: list[str] | None = None) -> None:
    """Run the study and print JSON."""
    from server.evaluation.tracks import track_study

    parser = argparse.ArgumentParser(description="Open-set lever study on an identity-disjoint split.")
    parser.add_argument("--identities", type=Path, required=True)
    parser.add_argument("--part", choices=["tune", "report"], default="tune")
    parser.add_argument("--variants", default="int8,int8+flip,int8-keypoints,float,dlib")
    parser.add_argument("--multi-variants", default="int8+flip", help="Variants for the K-photo lever.")
    parser.add_argument("--track-variants", default="", help="Variants for track fusion (synthetic tracks).")
    parser.add_argument("--draws", type=int, default=DEFAULT_DRAWS)
    parser.add_argument("--drop", default="", help="Comma-separated identities to leave out (label errors).")
    parser.add_argument("--models-dir", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=Path, default=None,
                        help="DET plot of the variants on the `eval identify` split of the part.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    logging.getLogger("device.decide.decision").setLevel(logging.WARNING)  # one line per simulated grant
    identities = _filtered(args.identities, args.part, {d for d in args.drop.split(",") if d})
    paths = [p for images in identities.values() for p in images]
    result: dict[str, Any] = {"part": args.part, "identities": len(identities), "images": len(paths),
                              "draws": args.draws, "one_shot": {}, "multi_template": {}, "tracks": {}}
    curves = {}
    for variant in [v for v in args.variants.split(",") if v]:
        vectors = embed_variant(variant, args.identities, paths, args.models_dir)
        result["one_shot"][variant] = one_shot_study(identities, vectors, args.draws, args.seed)
        logger.info("%s: %s", variant, json.dumps(result["one_shot"][variant]))
        if args.plot is not None:
            fpir, fnir, _ = det_curve(search_split(split_identities(identities, 1), vectors))
            curves[variant] = (fpir, fnir)
    if args.plot is not None and curves:
        plot_det(curves, args.plot, title=f"one-shot open set, {args.part} identities ({len(identities)})")
    for variant in [v for v in args.multi_variants.split(",") if v]:
        vectors = embed_variant(variant, args.identities, paths, args.models_dir)
        result["multi_template"][variant] = multi_template_study(identities, vectors, args.draws, args.seed)
    for variant in [v for v in args.track_variants.split(",") if v]:
        vectors = embed_variant(variant, args.identities, paths, args.models_dir)
        result["tracks"][variant] = track_study(args.identities, identities, vectors, VARIANTS[variant],
                                                args.models_dir, args.draws, args.seed)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
