"""Realistic gallery vectors for ``facegate bench gallery``: real face embeddings, then synthetic identities.

Real part: int8 embeddings of the shared CelebA crops (``REAL_PER_IDENTITY`` photos of each identity),
or, without ``../shared``, augmented crops of scikit-image's astronaut (one identity only: degraded,
said so in the output). Embeddings are cached under ``~/.cache/facegate/bench`` keyed by the pipeline
(model sha256, alignment, flip fusion). The synthetic identities built from them are
``server.evaluation.distractors.SyntheticFaces``.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import numpy.typing as npt

from facegate.progress import progress_bar
from server.evaluation.distractors import RealFaces, SyntheticFaces, Vectors, cosine_stats

__all__ = ["CHUNK", "RealFaces", "SyntheticFaces", "Vectors", "cosine_stats", "real_faces"]

logger = logging.getLogger(__name__)

REAL_PER_IDENTITY = 3  # photos per CelebA identity: 600 images, enough for both covariances
ASTRONAUT_AUGMENTS = 48  # crops/flips/brightness of the one packaged face
CACHE_DIR = Path.home() / ".cache" / "facegate" / "bench"
CHUNK = 65_536  # vectors generated per block (bounds memory at 1M)


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
    from device.vision.pipeline import FacePipeline
    from models.face.image import ImageError, decode_image

    with FacePipeline.from_models_dir(models_dir, embedder_variant="int8") as pipeline:
        source = "celeba" if shared is not None else "skimage-astronaut (one identity: degraded)"
        tag = f"{pipeline.ident}|{source}|{REAL_PER_IDENTITY}"  # model, alignment, flip fusion
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


