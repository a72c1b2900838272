"""Sample inputs for demos and tests: scikit-image's public-domain astronaut and a procedural mosaic."""

from __future__ import annotations

import numpy as np

from server.style.images import ByteImage

# Mosaic cells per image side: ~12 gives tiles big enough to read as "stained glass" at 256 px.
MOSAIC_CELLS_PER_SIDE = 12
# Width of the dark lead lines between tiles, as a fraction of a cell's size.
MOSAIC_LINE_FRACTION = 0.08
# Amplitude of the brush-stroke ripples inside each tile (0-1 value scale).
RIPPLE_AMPLITUDE = 0.18


def astronaut() -> ByteImage:
    """Eileen Collins, NASA portrait (public domain), as shipped by scikit-image: (512, 512, 3) RGB."""
    from skimage import data

    return np.asarray(data.astronaut(), dtype=np.uint8)  # type: ignore[no-untyped-call]


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV (all in 0-1) to RGB in 0-1."""
    i = np.floor(h * 6.0).astype(np.int64) % 6
    f = h * 6.0 - np.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    rgb = np.zeros((*h.shape, 3))
    for k, (r, g, b) in enumerate(choices):
        mask = i == k
        rgb[mask] = np.stack([r[mask], g[mask], b[mask]], axis=-1)
    return rgb


def mosaic(size: int = 512, seed: int = 7) -> ByteImage:
    """A colourful stained-glass pattern: Voronoi tiles in vivid hues with rippled strokes and dark leads."""
    rng = np.random.default_rng(seed)
    n_cells = MOSAIC_CELLS_PER_SIDE**2
    points = rng.uniform(0, size, size=(n_cells, 2))
    hues = rng.uniform(0, 1, size=n_cells)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    # Nearest and second-nearest seed per pixel, one seed at a time (memory stays at a few images).
    d1 = np.full((size, size), np.inf)
    d2 = np.full((size, size), np.inf)
    nearest = np.zeros((size, size), dtype=np.int64)
    for k, (py, px) in enumerate(points):
        dist = np.hypot(yy - py, xx - px)
        closer = dist < d1
        d2 = np.where(closer, d1, np.minimum(d2, dist))
        d1 = np.where(closer, dist, d1)
        nearest = np.where(closer, k, nearest)
    cell = size / MOSAIC_CELLS_PER_SIDE
    ripple = np.sin((xx * np.cos(hues[nearest] * 6.3) + yy * np.sin(hues[nearest] * 6.3)) / cell * 9.0)
    hue = (hues[nearest] + 0.04 * ripple) % 1.0
    sat = np.full_like(hue, 0.85)
    val = np.clip(0.8 + RIPPLE_AMPLITUDE * ripple, 0, 1)
    lead = (d2 - d1) < MOSAIC_LINE_FRACTION * cell
    val[lead] = 0.08
    rgb = _hsv_to_rgb(hue, sat, val)
    out: ByteImage = np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8)
    return out
