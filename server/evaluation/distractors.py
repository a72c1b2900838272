"""Synthetic face identities with the statistics of real embeddings: distractors for open-set figures.

Galleries of 10,000 or 1,000,000 persons cannot be filled with real faces here, so the open-set
calibration (``server.evaluation.openset``) and ``facegate bench gallery`` add synthetic identities that
keep the real second-order structure instead of isotropic noise. With mu the mean embedding, m_k the
real identity means and r_i the real within-identity residuals:

- centre = mu + sum_j w_j (m_j - mu) + sqrt(1 - sum w_j^2) * z, a random convex mixture of
  ``MIX_PARENTS`` real identities (Dirichlet weights) topped up by z, a Gaussian combination of all real
  identity offsets, so the centres' covariance matches the real between-identity covariance;
- a template or probe = normalise(centre + Gaussian combination of real residuals), whose covariance
  matches the real within-identity covariance.

The vectors are derived from real embeddings: like them they stay on the machine that made them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Vectors = npt.NDArray[np.float32]

MIX_PARENTS = 3  # real identities mixed into one synthetic identity
DIRICHLET_ALPHA = 0.5  # < 1: mixtures lean towards one parent, like real look-alikes
# Only used with a single real identity: between-identity spread as a multiple of the within-identity
# spread, as measured on the CelebA crops with the int8 model.
BETWEEN_OVER_WITHIN = 2.0


@dataclass(frozen=True, slots=True)
class RealFaces:
    """Unit embeddings of real photos with their identity labels."""

    vectors: Vectors
    labels: npt.NDArray[np.int64]
    source: str



def _unit(x: npt.NDArray[np.floating]) -> Vectors:
    out: Vectors = (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
    return out


class SyntheticFaces:
    """Draws synthetic identities and their photos from real embedding statistics."""

    def __init__(self, real: RealFaces, seed: int = 0, mix_parents: int = MIX_PARENTS) -> None:
        self.rng = np.random.default_rng(seed)
        self.mix_parents = mix_parents
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
        if self.mix_parents == 0:  # new identities only: a Gaussian with the between-identity covariance
            gaussian: npt.NDArray[np.float32] = (self.mu + self._combo(self.offsets, count)).astype(
                np.float32)
            return gaussian
        parents = self.rng.integers(0, len(self.offsets), (count, self.mix_parents))
        alpha = np.full(self.mix_parents, DIRICHLET_ALPHA)
        weights = self.rng.dirichlet(alpha, size=count).astype(np.float32)
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
