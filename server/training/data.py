"""Training data: identities from a folder or a CSV, the held-out-identity guard, and P x K batches.

Chips are cut by the product's own pipeline (detect + align, see ``server.training.chips``), so a model
trained here sees exactly what the door's embedder sees.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import numpy.typing as npt

from server.evaluation.verify import PairRow, PairsError
from server.evaluation.verify import read_pairs as evaluation_read_pairs

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
IDENTITIES_CSV = "identities.csv"
# Folds of the shared pairs.csv that are held out for the evaluation gate (never trained on).
EVAL_FOLDS: tuple[int, ...] = (9, 10)
# Identities named in an error message (the rest are counted).
MAX_NAMED_IDS = 5


class DataError(ValueError):
    """The training data cannot be read or does not fit the request."""


class IdentityLeakError(DataError):
    """Training identities overlap the held-out evaluation identities."""


@dataclass(frozen=True, slots=True)
class Sample:
    """One image: absolute path, its key (path relative to the dataset root) and its identity."""

    path: Path
    key: str
    identity: str


def _from_csv(csv_path: Path) -> list[Sample]:
    root = csv_path.parent
    try:
        with open(csv_path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or not {"path", "identity"} <= set(reader.fieldnames):
                raise DataError(f"{csv_path} needs the columns 'path' and 'identity'")
            rows = [(r["path"].strip(), r["identity"].strip()) for r in reader]
    except OSError as exc:
        raise DataError(f"cannot read {csv_path}: {exc}") from exc
    return [Sample(root / key, key, identity) for key, identity in rows if key and identity]


def _from_folders(root: Path) -> list[Sample]:
    samples = []
    for person in sorted(p for p in root.iterdir() if p.is_dir()):
        for image in sorted(person.iterdir()):
            if image.suffix.lower() in IMAGE_SUFFIXES and image.is_file():
                samples.append(Sample(image, f"{person.name}/{image.name}", person.name))
    return samples


def load_samples(source: Path) -> list[Sample]:
    """Samples from ``identities.csv`` (path, identity), a folder holding one, or one subfolder per person."""
    source = Path(source)
    if source.is_file():
        samples = _from_csv(source)
    elif (source / IDENTITIES_CSV).is_file():
        samples = _from_csv(source / IDENTITIES_CSV)
    elif source.is_dir():
        samples = _from_folders(source)
    else:
        raise DataError(f"training data {source} is neither a folder nor an identities CSV")
    if not samples:
        raise DataError(f"no images found in {source} (one subfolder per person, or identities.csv)")
    return samples


def pair_identities(pairs_csv: Path, folds: Iterable[int] = EVAL_FOLDS) -> set[str]:
    """Identities of every image in the given folds of a pairs CSV (fold, path_a, path_b, same).

    An image's identity comes from the ``identities.csv`` beside the pairs file when there is one,
    otherwise from its parent folder name.
    """
    pairs_csv = Path(pairs_csv)
    wanted = {int(f) for f in folds}
    index: dict[str, str] = {}
    if (pairs_csv.parent / IDENTITIES_CSV).is_file():
        index = {s.key: s.identity for s in _from_csv(pairs_csv.parent / IDENTITIES_CSV)}
    identities: set[str] = set()
    for row in read_pairs(pairs_csv):
        if row.fold in wanted:
            for key in (row.path_a, row.path_b):
                identities.add(index.get(key, Path(key).parent.name))
    if not identities:
        raise DataError(f"{pairs_csv} has no pairs in folds {sorted(wanted)}")
    return identities


def read_pairs(pairs_csv: Path, folds: Iterable[int] | None = None) -> list[PairRow]:
    """Rows of a pairs CSV (the evaluation protocol's reader), optionally only the given folds."""
    wanted = None if folds is None else frozenset(int(f) for f in folds)
    try:
        return evaluation_read_pairs(pairs_csv, wanted)
    except PairsError as exc:
        raise DataError(str(exc)) from exc


def check_disjoint(train_identities: Iterable[str], eval_identities: Iterable[str]) -> None:
    """Raise IdentityLeakError when any training identity is also an evaluation identity."""
    leaked = sorted(set(train_identities) & set(eval_identities))
    if leaked:
        named = ", ".join(leaked[:MAX_NAMED_IDS])
        more = f" and {len(leaked) - MAX_NAMED_IDS} more" if len(leaked) > MAX_NAMED_IDS else ""
        raise IdentityLeakError(
            f"{len(leaked)} training identities are in the held-out evaluation folds ({named}{more}); "
            "drop them from the training data (the gate's figures would be meaningless otherwise)"
        )


def exclude_identities(samples: Sequence[Sample], identities: set[str]) -> list[Sample]:
    """Samples whose identity is not in ``identities`` (logs how many were dropped)."""
    kept = [s for s in samples if s.identity not in identities]
    if len(kept) != len(samples):
        logger.info("dropped %d images of %d held-out identities from training",
                    len(samples) - len(kept), len({s.identity for s in samples} & identities))
    return kept


def data_hash(keys: Sequence[str], identities: Sequence[str], extra: str = "") -> str:
    """sha256 over the sorted (key, identity) list plus ``extra`` (e.g. the chip cache id): the lineage id."""
    digest = hashlib.sha256(extra.encode("utf-8"))
    for key, identity in sorted(zip(keys, identities, strict=True)):
        digest.update(f"{key}\t{identity}\n".encode())
    return digest.hexdigest()


def encode_labels(identities: Sequence[str]) -> tuple[npt.NDArray[np.int32], list[str]]:
    """Integer labels 0..C-1 and the sorted identity names they index."""
    names = sorted(set(identities))
    lookup = {name: i for i, name in enumerate(names)}
    return np.array([lookup[i] for i in identities], dtype=np.int32), names


class PKBatches(keras.utils.PyDataset):  # type: ignore[misc]  # keras is untyped
    """``steps`` batches per epoch of P identities x K samples; targets pack label (+ teacher embedding).

    Identities with fewer than K samples are drawn with replacement; identities with a single sample
    are left out (they can never form a positive pair). Batches are reproducible from (seed, epoch, step).
    """

    def __init__(self, inputs: npt.NDArray[Any], labels: npt.NDArray[np.int32], p: int, k: int, steps: int,
                 seed: int = 0, teacher: npt.NDArray[np.float32] | None = None, flip: bool = False) -> None:
        super().__init__()
        if p < 2 or k < 2:
            raise DataError(f"P x K batches need P >= 2 identities and K >= 2 images each, got {p} x {k}")
        if len(inputs) != len(labels) or (teacher is not None and len(teacher) != len(labels)):
            raise DataError("inputs, labels and teacher embeddings must have the same length")
        groups: dict[int, list[int]] = {}
        for index, label in enumerate(labels.tolist()):
            groups.setdefault(int(label), []).append(index)
        self.groups = {lab: np.array(idx) for lab, idx in groups.items() if len(idx) >= 2}
        if len(self.groups) < p:
            raise DataError(f"need at least P={p} identities with 2+ images, have {len(self.groups)}")
        self.inputs, self.labels, self.teacher = inputs, labels, teacher
        self.p, self.k, self.steps, self.seed, self.flip = p, k, steps, seed, flip
        self.epoch = 0
        self._ids = np.array(sorted(self.groups))

    def __len__(self) -> int:
        """Batches per epoch."""
        return self.steps

    def indices(self, step: int) -> npt.NDArray[np.int64]:
        """Sample indices of batch ``step`` of the current epoch (P blocks of K)."""
        rng = np.random.default_rng((self.seed, self.epoch, step))
        chosen = rng.choice(self._ids, size=self.p, replace=False)
        out = []
        for label in chosen:
            pool = self.groups[int(label)]
            out.append(rng.choice(pool, size=self.k, replace=len(pool) < self.k))
        return np.concatenate(out)

    def __getitem__(self, step: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """(inputs, packed targets) of one batch."""
        idx = self.indices(step)
        x = self.inputs[idx].astype(np.float32)
        if self.flip:
            # Mirror half the images; mirrored faces are still the same person (teacher targets are
            # embeddings of the unflipped chip, so flip only when not distilling).
            rng = np.random.default_rng((self.seed, self.epoch, step, 1))
            mirror = rng.random(len(idx)) < 0.5
            x[mirror] = x[mirror, :, ::-1]
        y = self.labels[idx].astype(np.float32)[:, None]
        if self.teacher is not None:
            y = np.concatenate([y, self.teacher[idx].astype(np.float32)], axis=1)
        return x, y

    def on_epoch_end(self) -> None:
        """Advance the epoch so the next epoch draws new batches."""
        self.epoch += 1
