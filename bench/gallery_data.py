"""Realistic gallery vectors for ``facegate bench gallery``: real face embeddings, then synthetic identities.

Real part: int8 embeddings of the shared CelebA crops (``REAL_PER_IDENTITY`` photos of each identity),
or, without ``../shared``, augmented crops of scikit-image's astronaut (one identity only: degraded,
said so in the output). Embeddings are cached under ``~/.cache/facegate/bench`` keyed by model sha256.

Synthetic identities keep the real second-order structure instead of isotropic noise. With mu the mean
embedding, m_k the real identity means and r_i the real within-identity residuals:

- centre = mu + sum_j w_j (m_j - mu) + sqrt(1 - sum w_j^2) * z, a random convex mixture of
  ``MIX_PARENTS`` real identities (Dirichlet weights) topped up by z, a Gaussian combination of all real
  identity offsets, so the centres' covariance matches the real between-identity covariance;
- a template or probe = normalise(centre + Gaussian combination of real residuals), whose covariance
  matches the real within-identity covariance.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from facegate.progress import progress_bar

logger = logging.getLogger(__name__)

Vectors = npt.NDArray[np.float32]

REAL_PER_IDENTITY = 3  # photos per CelebA identity: 600 images, enough for both covariances
MIX_PARENTS = 3  # real identities mixed into one synthetic identity
DIRICHLET_ALPHA = 0.5  # < 1: mixtures lean towards one parent, like real look-alikes
ASTRONAUT_AUGMENTS = 48  # crops/flips/brightness of the one packaged face
CACHE_DIR = Path.home() / ".cache" / "facegate" / "bench"
CHUNK = 65_536  # vectors generated per block (bounds memory at 1M)
# Only used without ../shared (one real identity): between-identity spread as a multiple of the
# within-identity spread, as measured on the CelebA crops with the int8 model.
BETWEEN_OVER_WITHIN = 2.0


@dataclass(frozen=True, slots=True)
class RealFaces:
    """Unit embeddings of real photos with their identity labels."""

    vectors: Vectors
    labels: npt.NDArray[np.int64]
    source: str


def _celeba_paths(shared: Path) -> list[tuple[Path, int]]:
    root = shared / "data" / "celeba-faces"
    out: list[tuple[Path, int]] = []
    for label, folder in enumerate(sorted(p for p in root.iterdir() if p.is_dir())):
        out.extend((path, label) for path in sorted(folder.glob("*.jpg"))[:REAL_PER_IDENTITY])
    return out


def _astronaut_images() -> list[npt.NDArray[np.uint8]]:
    import cv2
    from skimage import data

    base: npt.NDArray[np.uint8] = data.astronaut()  # type: ignore[no-untyped-call]
    rng = np.random.default_rng(0)
    images = []
    for _ in range(ASTRONAUT_AUGMENTS):
        x0, y0 = (int(v) for v in rng.integers(0, 60, 2))
        side = int(rng.integers(380, 452))
        crop = np.asarray(cv2.resize(base[y0:y0 + side, x0:x0 + side], (320, 320)), np.uint8)
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        gain = float(rng.uniform(0.7, 1.3))
        images.append(np.clip(crop.astype(np.float32) * gain, 0, 255).astype(np.uint8))
    return images


def real_faces(models_dir: Path, shared: Path | None, progress: bool = True) -> RealFaces:
    """Embed (or load cached) real faces with the int8 pipeline."""
    from device.vision.image import ImageError, decode_image
    from device.vision.pipeline import FacePipeline

    with FacePipeline.from_models_dir(models_dir, embedder_variant="int8") as pipeline:
        source = "celeba" if shared is not None else "skimage-astronaut (one identity: degraded)"
        tag = f"{pipeline.model_sha256}|{source}|{REAL_PER_IDENTITY}"
        key = hashlib.sha256(tag.encode()).hexdigest()[:16]
        cache = CACHE_DIR / f"real-{key}.npz"
        if cache.is_file():
            saved = np.load(cache)
            return RealFaces(saved["vectors"], saved["labels"], source)
        images: list[tuple[npt.NDArray[np.uint8], int]] = []
        if shared is not None:
            for path, label in _celeba_paths(shared):
                try:
                    images.append((decode_image(path.read_bytes()), label))
                except (OSError, ImageError) as exc:
                    logger.warning("skipping %s: %s", path.name, exc)
        else:
            images = [(img, 0) for img in _astronaut_images()]
        vectors, labels = [], []
        with progress_bar("embedding real faces", len(images), progress) as advance:
            for rgb, label in images:
                chip = pipeline.largest_chip(rgb)
                if chip is not None:
                    vectors.append(pipeline.embed(chip).vector)
                    labels.append(label)
                advance()
    if len(vectors) < 2:
        raise ValueError("fewer than two real faces were embedded; check the models and the images")
    result = RealFaces(np.stack(vectors).astype(np.float32), np.asarray(labels, np.int64), source)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    np.savez(cache, vectors=result.vectors, labels=result.labels)
    return result


def _unit(x: npt.NDArray[np.floating]) -> Vectors:
    out: Vectors = (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
    return out


class SyntheticFaces:
    """Draws synthetic identities and their photos from real embedding statistics."""

    def __init__(self, real: RealFaces, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        ids = np.unique(real.labels)
        means = np.stack([real.vectors[real.labels == i].mean(axis=0) for i in ids])
        self.mu = real.vectors.mean(axis=0)
        self.offsets = means - self.mu  # (K, d) between-identity offsets
        residuals = real.vectors - means[np.searchsorted(ids, real.labels)]
        # Identities with one photo have zero residual; keep only informative rows.
        informative = np.linalg.norm(residuals, axis=1) > 1e-6
        if informative.sum() >= 2:
            residuals = residuals[informative]
            # mean-removed residuals underestimate the spread by (n-1)/n per identity; undo that
            per_id = np.bincount(np.searchsorted(ids, real.labels))
            n = float(np.median(per_id[per_id > 1])) if np.any(per_id > 1) else 2.0
            residuals = residuals * np.sqrt(n / (n - 1))
        else:
            residuals = 0.05 * self.rng.standard_normal((16, real.vectors.shape[1]))
        self.residuals = residuals.astype(np.float32)
        if len(ids) < 2:  # degraded (astronaut only): identity offsets shaped like the residuals
            self.offsets = BETWEEN_OVER_WITHIN * self.residuals

    def _combo(self, rows: npt.NDArray[np.float32], count: int) -> npt.NDArray[np.float32]:
        """``count`` Gaussian combinations of ``rows`` with the rows' covariance."""
        coeffs = self.rng.standard_normal((count, len(rows))).astype(np.float32) / np.sqrt(len(rows))
        out: npt.NDArray[np.float32] = coeffs @ rows
        return out

    def centres(self, count: int) -> npt.NDArray[np.float32]:
        """Unnormalised identity centres."""
        parents = self.rng.integers(0, len(self.offsets), (count, MIX_PARENTS))
        weights = self.rng.dirichlet(np.full(MIX_PARENTS, DIRICHLET_ALPHA), size=count).astype(np.float32)
        mixed = np.einsum("nk,nkd->nd", weights, self.offsets[parents])
        top_up = np.sqrt(np.clip(1.0 - (weights ** 2).sum(axis=1, keepdims=True), 0.0, 1.0))
        out: npt.NDArray[np.float32] = (self.mu + mixed + top_up * self._combo(self.offsets, count)).astype(
            np.float32)
        return out

    def photos(self, centres: npt.NDArray[np.float32]) -> Vectors:
        """One unit embedding per centre row (a new photo of that identity)."""
        return _unit(centres + self._combo(self.residuals, len(centres)))


def cosine_stats(vectors: Vectors, labels: npt.NDArray[np.int64], pairs: int = 20_000,
                 seed: int = 1) -> dict[str, float | None]:
    """Mean genuine and impostor cosine over random pairs."""
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, len(vectors), (2, pairs * 4))
    same = labels[a] == labels[b]
    keep_gen = np.flatnonzero(same & (a != b))[:pairs]
    keep_imp = np.flatnonzero(~same)[:pairs]
    gen = (vectors[a[keep_gen]] * vectors[b[keep_gen]]).sum(axis=1)
    imp = (vectors[a[keep_imp]] * vectors[b[keep_imp]]).sum(axis=1)
    return {"genuine_cos": round(float(gen.mean()), 4) if gen.size else None,
            "impostor_cos": round(float(imp.mean()), 4) if imp.size else None,
            "impostor_cos_p99": round(float(np.quantile(imp, 0.99)), 4) if imp.size else None}
