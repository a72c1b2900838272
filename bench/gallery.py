"""``facegate bench gallery``: search latency, recall@1 and stranger rate of the index the config picks.

The vectors are synthetic (``server.evaluation.distractors.SyntheticFaces``): mixtures of real CelebA
int8 embeddings that keep their between- and within-identity covariance, not real faces. Gallery
identities and stranger identities are drawn from two disjoint halves of the real identities, so a
stranger is never a near-copy of an enrolled person by construction.

One thread (``faiss.omp_set_num_threads(1)``). For each size N: build a gallery of N templates
(``TEMPLATES_PER_IDENTITY`` per synthetic identity, see ``bench.gallery_data``), time ``Gallery.search``
(the door's call: top-k, identity max, runner-up; ``p50_ms``/``p99_ms``) one probe at a time, and
compare the index's top-1 template with exact search (``recall_at_1``). The baseline measured in the
same run is a raw exact FAISS flat search of top-k at the same N; ``speedup_vs_exact`` is its p50 over the
raw top-k search of our index (``index_p50_ms``), so Python overhead is on neither side. Then 10% of the
persons are removed in place and the search is timed again (the cost of HNSW tombstones, or of IVF's
in-place removal). Non-mated probes (new synthetic identities) measure ``fpir``: the share of strangers
the door's rule (``tau``/``delta`` of the calibrated operating point for that many persons, or the
config's) would let in; ``fnir`` is the same rule on the mated probes. Speed and recall are about the
index, so the bench scores a person by their best template (``identity_score = "max"``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import click
import numpy as np
import numpy.typing as npt

from bench.gallery_data import CHUNK, RealFaces, SyntheticFaces, cosine_stats, real_faces
from facegate.progress import progress_bar

logger = logging.getLogger(__name__)

DEFAULT_SIZES = "10000,100000,1000000"
TEMPLATES_PER_IDENTITY = 2  # a typical enrollment keeps two or three photos per person
DEFAULT_QUERIES = 1000
EXACT_BASELINE_QUERIES = 50  # exact search at 1M costs tens of ms per probe
REMOVE_FRACTION = 0.1
EMBEDDING_DIM = 128
FAKE_SHA = "bench"
TIE_TOLERANCE = 1e-5  # float32 rounding differs between FAISS and numpy


def _gallery_config(config_path: Path | None, index: str) -> Any:
    from device.config import GalleryConfig, load_device_config

    cfg = (load_device_config(config_path).gallery if config_path else GalleryConfig()).model_copy(
        update={"identity_score": "max"})
    if index == "auto":
        return cfg
    if index == "flat":
        return cfg.model_copy(update={"exact_max": 10 ** 9})
    return cfg.model_copy(update={"approximate": index, "exact_max": min(cfg.exact_max, 1000)})


def _percentiles(samples: list[float]) -> tuple[float, float]:
    arr = np.asarray(samples) * 1000.0
    return round(float(np.percentile(arr, 50)), 4), round(float(np.percentile(arr, 99)), 4)


def _exact_top1(vectors: npt.NDArray[np.float32], ids: npt.NDArray[np.int64],
                probes: npt.NDArray[np.float32]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """Exact top-1 template id and cosine per probe (blocked matmul)."""
    best = np.full(len(probes), -np.inf, np.float32)
    arg = np.zeros(len(probes), np.int64)
    for start in range(0, len(vectors), CHUNK * 4):
        block = vectors[start:start + CHUNK * 4] @ probes.T  # (block, Q)
        j = block.argmax(axis=0)
        s = block[j, np.arange(len(probes))]
        better = s > best
        best[better], arg[better] = s[better], ids[start + j[better]]
    return arg, best


def _rule(persons: int, decision: Any) -> tuple[float, float]:
    """(tau, delta): the config's, or the calibrated operating point for this many persons."""
    from device.decide.operating_point import operating_point

    if decision is not None:
        return float(decision.tau), float(decision.delta)
    row = operating_point(persons)
    return row.tau, row.delta


def bench_size(n: int, synth: SyntheticFaces, gallery_cfg: Any, queries: int,
               progress: bool, strangers: SyntheticFaces | None = None,
               decision: Any = None) -> dict[str, Any]:
    """Build, time and score one gallery size."""
    import faiss

    from device.gallery import Gallery

    identities = max(2, n // TEMPLATES_PER_IDENTITY)
    centres = np.empty((identities, EMBEDDING_DIM), np.float32)
    items = []
    with progress_bar(f"generating {n} templates", identities, progress) as advance:
        for start in range(0, identities, CHUNK):
            block = synth.centres(min(CHUNK, identities - start))
            centres[start:start + len(block)] = block
            photos = [synth.photos(block) for _ in range(TEMPLATES_PER_IDENTITY)]
            for i in range(len(block)):
                pid = f"id{start + i}"
                items.append((pid, pid, np.stack([p[i] for p in photos])))
            advance(len(block))
    gallery = Gallery.create(Path(os.devnull), EMBEDDING_DIM, FAKE_SHA, gallery_cfg)
    t0 = time.perf_counter()
    gallery.add_many(items)
    build_s = time.perf_counter() - t0
    del items
    who = synth.rng.integers(0, identities, queries)
    probes = synth.photos(centres[who])
    tids, vectors = gallery.export_vectors()
    tid_arr = np.asarray(tids, np.int64)
    exact, exact_score = _exact_top1(vectors, tid_arr, probes)

    latencies, raw = [], []
    agree = 0
    with progress_bar(f"searching N={n}", queries, progress) as advance:
        for q in range(queries):
            t = time.perf_counter()
            match = gallery.search(probes[q])
            latencies.append(time.perf_counter() - t)
            t = time.perf_counter()
            gallery.search_templates(probes[q], gallery_cfg.top_k)
            raw.append(time.perf_counter() - t)
            agree += match.person_id == gallery.owner_of(int(exact[q])) or \
                abs(match.score - float(exact_score[q])) <= TIE_TOLERANCE
            advance(1)
    tau, delta = _rule(identities, decision)
    mated = gallery.search_many(probes)
    fnir = float(np.mean([not (m.person_id == f"id{w}" and m.score >= tau and m.margin >= delta)
                          for m, w in zip(mated, who, strict=True)]))
    source = strangers if strangers is not None else synth
    nonmated = gallery.search_many(source.photos(source.centres(queries)))
    fpir = float(np.mean([m.score >= tau and m.margin >= delta for m in nonmated]))
    scores, top1 = gallery.search_templates(probes, 1)
    # a different template with the very same cosine (a tie) is as good as the exact answer
    recall = float(np.mean((top1[:, 0] == exact) | (np.abs(scores[:, 0] - exact_score) <= TIE_TOLERANCE)))
    p50, p99 = _percentiles(latencies)
    index_p50, _ = _percentiles(raw)

    flat = faiss.IndexFlatIP(EMBEDDING_DIM)
    flat.add(vectors)
    base = []
    for q in range(min(EXACT_BASELINE_QUERIES, queries)):
        t = time.perf_counter()
        flat.search(probes[q:q + 1], gallery_cfg.top_k)
        base.append(time.perf_counter() - t)
    del flat, vectors
    exact_p50, _ = _percentiles(base)

    victims = synth.rng.choice(identities, max(1, int(REMOVE_FRACTION * identities)), replace=False)
    t0 = time.perf_counter()
    for v in victims:
        gallery.remove_person(f"id{v}")
    remove_s = time.perf_counter() - t0
    after = []
    for q in range(min(200, queries)):
        t = time.perf_counter()
        gallery.search(probes[q])
        after.append(time.perf_counter() - t)
    after_p50, _ = _percentiles(after)
    params = gallery.params.as_dict()
    gallery.close()
    return {
        "n": n, "identities": identities, "index": params, "build_s": round(build_s, 2),
        "p50_ms": p50, "p99_ms": p99, "recall_at_1": round(recall, 4),
        "identity_agreement": round(agree / queries, 4),
        "index_p50_ms": index_p50, "exact_p50_ms": exact_p50,
        "speedup_vs_exact": round(exact_p50 / index_p50, 2) if index_p50 else None,
        "remove_10pct_s": round(remove_s, 2), "p50_ms_after_remove": after_p50,
        "tau": tau, "delta": delta, "nonmated": queries, "fpir": round(fpir, 5), "fnir": round(fnir, 4),
    }


def _halves(real: RealFaces) -> tuple[RealFaces, RealFaces] | None:
    """The real identities split in two (even / odd label), or None with fewer than 4 identities."""
    labels = np.unique(real.labels)
    if len(labels) < 4:
        return None
    even = np.isin(real.labels, labels[::2])
    return (RealFaces(real.vectors[even], real.labels[even], real.source),
            RealFaces(real.vectors[~even], real.labels[~even], real.source))


def run_bench(models_dir: Path, shared: Path | None, sizes: list[int], queries: int, gallery_cfg: Any,
              seed: int = 0, progress: bool = True, decision: Any = None) -> dict[str, Any]:
    """The whole benchmark as a JSON-ready dict."""
    import faiss

    faiss.omp_set_num_threads(1)
    real = real_faces(models_dir, shared, progress)
    halves = _halves(real)
    # gallery identities from one half of the real identities, strangers from the other
    synth = SyntheticFaces(halves[0] if halves else real, seed)
    strangers = SyntheticFaces(halves[1], seed + 1) if halves else None
    sample_ids = np.repeat(np.arange(2000), 2)
    sample = synth.photos(np.repeat(synth.centres(2000), 2, axis=0))
    results = []
    for n in sizes:
        results.append(bench_size(n, synth, gallery_cfg, queries, progress, strangers, decision))
        logger.info("N=%d: %s", n, results[-1])
    return {
        "threads": 1,
        "source": real.source,
        "real": {"images": len(real.vectors), "identities": len(np.unique(real.labels)),
                 **cosine_stats(real.vectors, real.labels)},
        "synthetic": cosine_stats(sample, sample_ids),
        "templates_per_identity": TEMPLATES_PER_IDENTITY,
        "queries": queries,
        "config": gallery_cfg.model_dump(),
        "results": results,
    }


def _sizes(value: str) -> list[int]:
    try:
        sizes = [int(float(v)) for v in value.split(",") if v.strip()]
    except ValueError as exc:
        raise click.BadParameter(f"sizes must be comma-separated integers, got '{value}'") from exc
    if not sizes or min(sizes) < 4:
        raise click.BadParameter("give sizes of at least 4 templates")
    return sizes


@click.command("gallery")
@click.option("--sizes", default=DEFAULT_SIZES, show_default=True, help="Gallery sizes (templates).")
@click.option("--queries", type=click.IntRange(min=10), default=DEFAULT_QUERIES, show_default=True,
              help="Probes timed per size.")
@click.option("--index", type=click.Choice(["auto", "flat", "ivf", "hnsw"]), default="auto",
              show_default=True, help="auto = what the device config picks for each N.")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="Device config whose [gallery] section to use (default: defaults).")
@click.option("--models-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Built models folder (default: the `facegate models build` cache).")
@click.option("--shared", type=click.Path(path_type=Path), default=None,
              help="Shared data folder (CelebA crops; default ../shared); the astronaut when absent.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object on stdout.")
def gallery(sizes: str, queries: int, index: str, config_path: Path | None, models_dir: Path | None,
            shared: Path | None, seed: int, as_json: bool) -> None:
    """Gallery search p50/p99 (ms), recall@1 vs exact search and stranger FPIR at 10k, 100k, 1M templates."""
    from device.config import load_device_config
    from models.runtime.assets import default_models_dir
    from models.runtime.manifest import ManifestError

    root = shared or Path(os.environ.get("FACEGATE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
    celeba = root if (root / "data" / "celeba-faces").is_dir() else None
    try:
        decision = load_device_config(config_path).decision if config_path else None
        result = run_bench(models_dir or default_models_dir(), celeba, _sizes(sizes), queries,
                           _gallery_config(config_path, index), seed, progress=not as_json, decision=decision)
    except (ManifestError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"one thread; vectors: {result['source']} (real genuine/impostor cos "
               f"{result['real']['genuine_cos']}/{result['real']['impostor_cos']}, synthetic "
               f"{result['synthetic']['genuine_cos']}/{result['synthetic']['impostor_cos']})")
    click.echo(f"{'N':>9} {'index':>6} {'build s':>8} {'p50 ms':>8} {'p99 ms':>8} {'recall@1':>9} "
               f"{'index p50':>10} {'exact p50':>10} {'speedup':>8} {'tau':>7} {'FPIR':>8} {'FNIR':>7}")
    for row in result["results"]:
        click.echo(f"{row['n']:>9} {row['index']['kind']:>6} {row['build_s']:>8} {row['p50_ms']:>8} "
                   f"{row['p99_ms']:>8} {row['recall_at_1']:>9} {row['index_p50_ms']:>10} "
                   f"{row['exact_p50_ms']:>10} {row['speedup_vs_exact']:>7}x {row['tau']:>7.4f} "
                   f"{row['fpir']:>8.5f} {row['fnir']:>7.4f}")
    click.echo("vectors are synthetic mixtures of real embeddings (strangers from other real identities); "
               "FPIR/FNIR at the calibrated operating point for that many persons (or the config's)")

