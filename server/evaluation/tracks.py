"""Track-level fusion at the door, measured on synthetic tracks: voting frame by frame vs fused embeddings.

There is no door video of the shared identities, so each probe photo becomes a short *track*:
``FRAMES`` frames that a camera could give of that photo held still, each with a random small
rotation, scale and shift, brightness and contrast change, blur, sensor noise and JPEG
re-encoding (``camera_frame``). Every frame goes through the whole pipeline (detect, align, embed),
so detector and landmark noise are real; what a real visit adds (pose and expression changes) is
not there, so the gain measured here is a lower bound of what a real door could see.

For each role draw (half of the identities enrolled from one original photo), each track is fed to
the real ``DecisionEngine`` frame by frame (liveness live, ``confirm_k`` of ``confirm_n`` votes), with
each frame's own embedding (``frames = 1``) or the ``TrackFusion`` mean of its best frames. A track
of an enrolled person is a hit when it is granted to that person; a stranger's track is a false
positive when it is granted to anyone. FNIR at a track FPIR is read off a grid of tau.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from server.evaluation.verify import Vector

logger = logging.getLogger(__name__)

FRAMES = 5  # frames per synthetic track
FUSE_CHOICES = (1, 3, 5)  # TrackFusion sizes compared (1 = vote on each frame alone)
# Thresholds tried (the engine runs once per tau): fine enough that FPIR moves by about one track per
# step around 1e-2 and 1e-3 with the int8 embedder.
TAU_GRID = tuple(round(float(t), 4) for t in np.arange(0.925, 0.9701, 0.0005))
# Camera-like perturbations of a still photo (a face held in front of a door camera for a second).
MAX_ROTATION_DEG = 4.0
SCALE_RANGE = (0.9, 1.1)
MAX_SHIFT = 0.04  # of the image width
GAIN_RANGE = (0.85, 1.15)
MAX_OFFSET = 15.0  # grey levels
MAX_BLUR_SIGMA = 1.2
NOISE_SIGMA = 3.0
JPEG_QUALITY = (75, 95)


def camera_frame(rgb: npt.NDArray[np.uint8], rng: np.random.Generator) -> npt.NDArray[np.uint8]:
    """One perturbed frame of a still photo."""
    import cv2

    h, w = rgb.shape[:2]
    matrix = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG),
                                     rng.uniform(*SCALE_RANGE))
    matrix[:, 2] += rng.uniform(-MAX_SHIFT, MAX_SHIFT, 2) * w
    frame = np.asarray(cv2.warpAffine(rgb, matrix, (w, h), borderMode=cv2.BORDER_REPLICATE), np.float64)
    frame = frame * rng.uniform(*GAIN_RANGE) + rng.uniform(-MAX_OFFSET, MAX_OFFSET)
    sigma = rng.uniform(0.0, MAX_BLUR_SIGMA)
    if sigma > 0.3:
        frame = np.asarray(cv2.GaussianBlur(frame, (0, 0), sigma), np.float64)
    pixels = np.clip(frame + rng.normal(0.0, NOISE_SIGMA, frame.shape), 0, 255).astype(np.uint8)
    quality = int(rng.integers(*JPEG_QUALITY))
    ok, buf = cv2.imencode(".jpg", pixels[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    decoded = cv2.imdecode(buf, cv2.IMREAD_COLOR) if ok else None
    if decoded is None:
        raise ValueError("JPEG round trip of a synthetic frame failed")
    return np.ascontiguousarray(np.asarray(decoded, np.uint8)[:, :, ::-1])


def track_vectors(root: Path, paths: list[str], spec: dict[str, Any], models_dir: Path | None,
                  seed: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float64]]:
    """(len(paths), FRAMES, d) embeddings and (len(paths), FRAMES) chip qualities (-1: no face); cached."""
    from device.vision.pipeline import FacePipeline
    from models.face.align import AlignMethod
    from models.face.image import ImageError, decode_image
    from models.runtime.assets import default_models_dir
    from server.evaluation.embed_cache import cache_dir

    directory = models_dir if models_dir is not None else default_models_dir()
    with FacePipeline.from_models_dir(directory, embedder_variant=spec["pipeline"],
                                      align_method=AlignMethod(spec["align"]),
                                      flip_fusion=spec["flip"]) as pipeline:
        tag = "|".join([pipeline.ident, str(FRAMES), str(seed), str(root.resolve()), *paths])
        cache = cache_dir() / f"tracks-{hashlib.sha256(tag.encode()).hexdigest()[:20]}.npz"
        if cache.is_file():
            with np.load(cache) as saved:
                return saved["vectors"], saved["quality"]
        rng = np.random.default_rng(seed)
        vectors = np.zeros((len(paths), FRAMES, 128), np.float32)
        quality = np.full((len(paths), FRAMES), -1.0)
        for i, rel in enumerate(paths):
            try:
                rgb = decode_image((root / rel).read_bytes())
            except (OSError, ImageError) as exc:
                logger.warning("cannot read %s: %s", rel, exc)
                continue
            for t in range(FRAMES):
                chip = pipeline.largest_chip(camera_frame(rgb, rng))
                if chip is not None:
                    vectors[i, t], quality[i, t] = pipeline.embed(chip).vector, chip.quality
            if i % 500 == 0:
                logger.info("synthetic tracks: %d/%d photos", i, len(paths))
    cache.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(os.open(cache, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as handle:
        np.savez(handle, vectors=vectors, quality=quality)
    return vectors, quality


def _granted(matches: list[Any], cfg: Any) -> str | None:
    """The person a track is granted to by the real decision engine, or None."""
    from core.types import DecisionKind, LivenessResult, LivenessVerdict
    from device.decide.decision import DecisionEngine, FaceObservation

    live = LivenessResult(LivenessVerdict.LIVE)
    engine = DecisionEngine(cfg)
    for t, match in enumerate(matches):
        decision = engine.observe(FaceObservation(1, match, live, float(t)))
        if decision is not None and decision.kind is DecisionKind.GRANTED:
            return decision.person_id
    return None


def track_study(root: Path, identities: dict[str, list[str]], enroll_vectors: dict[str, Vector | None],
                spec: dict[str, Any], models_dir: Path | None, draws: int, seed: int) -> dict[str, Any]:
    """FNIR at track FPIR 1e-2 / 1e-3 for a single frame, voting per frame, and each fusion size."""
    from device.config import DecisionConfig, GalleryConfig
    from device.decide.fusion import TrackFusion
    from device.gallery import Gallery
    from server.evaluation.openset import random_draw

    paths = [p for images in identities.values() for p in images]
    row = {p: i for i, p in enumerate(paths)}
    vectors, quality = track_vectors(root, paths, spec, models_dir, seed)
    rng = np.random.default_rng(seed)
    modes = {"single frame": 1, **{f"vote, fuse {k}": k for k in FUSE_CHOICES}}
    counts = {(mode, tau): np.zeros(4, np.int64) for mode in modes for tau in TAU_GRID}
    for _ in range(max(1, draws // 2)):  # the engine runs per tau: half the draws keep it to minutes
        draw = random_draw(identities, 1, rng)
        with Gallery.create(Path(os.devnull), vectors.shape[2], "tracks", GalleryConfig()) as gallery:
            templates = {n: [v for v in (enroll_vectors.get(p) for p in images) if v is not None]
                         for n, images in draw.enroll.items()}
            gallery.add_many((n, n, np.stack(vecs)) for n, vecs in templates.items() if vecs)
            tracks = [(n, p, True) for n, p in draw.mated if n in gallery] + \
                [(n, p, False) for n, p in draw.nonmated]
            for mode, fuse in modes.items():
                searched = []
                for _, p, _ in tracks:
                    fusion, i = TrackFusion(fuse), row[p]
                    seq = [fusion.update(0, vectors[i, t], float(quality[i, t]))
                           for t in range(vectors.shape[1]) if quality[i, t] >= 0]
                    seq = seq[:1] if mode == "single frame" else seq
                    searched.append(gallery.search_many(np.stack(seq)) if seq else [])
                for tau in TAU_GRID:
                    single = mode == "single frame"
                    cfg = DecisionConfig(tau=tau, delta=0.0, confirm_k=1 if single else 2,
                                         confirm_n=1 if single else 3)
                    c = counts[(mode, tau)]
                    for (name, _, mated), matches in zip(tracks, searched, strict=True):
                        who = _granted(matches, cfg)
                        if mated:
                            c[0] += who == name
                            c[1] += 1
                        else:
                            c[2] += who is not None
                            c[3] += 1
    out: dict[str, Any] = {}
    for mode in modes:
        points = [(tau, 1.0 - c[0] / c[1], c[2] / c[3]) for tau in TAU_GRID for c in [counts[(mode, tau)]]]
        out[mode] = {}
        for target in ("0.01", "0.001"):
            ok = [p for p in points if p[2] <= float(target)]
            best = min(ok, key=lambda p: (p[1], p[0])) if ok else None
            out[mode][target] = None if best is None else {"fnir": round(best[1], 4), "tau": best[0],
                                                           "fpir": round(best[2], 5)}
    return out
