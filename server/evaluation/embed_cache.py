"""Per-image embeddings kept on disk between evaluation runs, keyed by what produced them.

The dlib reference costs ~100 ms per face and every study re-reads the same images, so `eval identify`,
`eval calibrate --open-set` and the lever study embed each image once per pipeline. A cache file holds
the embeddings made by one embedder ``ident`` (model sha256, detector, alignment, flip fusion), keyed by
the image's resolved path (a folder of symlinks reuses them); an entry is reused only while the
image's size and modification time are unchanged. The files live
outside the repository (``$FACEGATE_EVAL_CACHE``, default ``~/.cache/facegate/eval``) and hold
embeddings, which are biometric data: they are written 0600 and never logged.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np

from core.files import atomic_write_bytes
from facegate.progress import progress_bar
from server.evaluation.verify import ImageEmbedder, Vector

logger = logging.getLogger(__name__)

CACHE_ENV = "FACEGATE_EVAL_CACHE"
# Save progress every this many new images, so an interrupted dlib run (minutes) keeps its work.
SAVE_EVERY = 500


def cache_dir() -> Path:
    """Where evaluation embeddings are cached."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "facegate" / "eval"))


def _stamp(path: Path) -> str:
    try:
        st = path.stat()
    except OSError:
        return "missing"
    return f"{st.st_size}:{st.st_mtime_ns}"


class EmbeddingCache:
    """The cached embeddings of one embedder (load, fill the missing, save)."""

    def __init__(self, ident: str) -> None:
        key = hashlib.sha256(ident.encode()).hexdigest()[:20]
        self.path = cache_dir() / f"{key}.npz"
        self._entries: dict[str, tuple[str, Vector | None]] = {}
        self._load()

    def _load(self) -> None:
        if not self.path.is_file():
            return
        try:
            with np.load(self.path, allow_pickle=False) as saved:
                for rel, stamp, vec, found in zip(saved["paths"].tolist(), saved["stamps"].tolist(),
                                                  saved["vectors"], saved["found"], strict=True):
                    self._entries[str(rel)] = (str(stamp), vec.astype(np.float32) if found else None)
        except (OSError, ValueError, KeyError) as exc:
            logger.warning("ignoring unreadable embedding cache %s: %s", self.path.name, exc)
            self._entries.clear()

    def save(self) -> None:
        """Write the cache atomically (0600)."""
        import io

        if not self._entries:
            return
        paths = sorted(self._entries)
        dim = next((len(v) for _, v in self._entries.values() if v is not None), 128)
        vectors = np.zeros((len(paths), dim), np.float32)
        found = np.zeros(len(paths), bool)
        for i, rel in enumerate(paths):
            vec = self._entries[rel][1]
            if vec is not None:
                vectors[i], found[i] = vec, True
        buffer = io.BytesIO()
        np.savez(buffer, paths=np.array(paths), stamps=np.array([self._entries[p][0] for p in paths]),
                 vectors=vectors, found=found)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write_bytes(self.path, buffer.getvalue(), mode=0o600)

    def get(self, image: Path) -> tuple[bool, Vector | None]:
        """(hit, vector): a hit only when the image is unchanged since it was embedded."""
        path = image.resolve()
        entry = self._entries.get(str(path))
        if entry is None or entry[0] != _stamp(path):
            return False, None
        return True, entry[1]

    def put(self, image: Path, vector: Vector | None) -> None:
        """Remember one image's embedding (None: no face found)."""
        path = image.resolve()
        self._entries[str(path)] = (_stamp(path), vector)


def cached_embed_all(embedder: ImageEmbedder, root: Path, paths: list[str],
                     progress: bool = True) -> dict[str, Vector | None]:
    """Each distinct image embedded once, through the disk cache: only images not seen before are run."""
    cache = EmbeddingCache(embedder.ident)
    out: dict[str, Vector | None] = {}
    todo = []
    for rel in dict.fromkeys(paths):
        hit, vec = cache.get(root / rel)
        if hit:
            out[rel] = vec
        else:
            todo.append(rel)
    if todo:
        logger.info("embedding %d images (%d cached) with %s", len(todo), len(out), embedder.ident)
    with progress_bar("embedding images", len(todo), progress) as advance:
        for n, rel in enumerate(todo, 1):
            out[rel] = embedder.embed_file(root / rel)
            cache.put(root / rel, out[rel])
            if n % SAVE_EVERY == 0:
                cache.save()
            advance()
    if todo:
        cache.save()
    return out
