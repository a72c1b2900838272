"""Which landmarks should drive alignment? A study on the pairs protocol's *training* folds only.

``python -m server.evaluation.align_study --pairs .../pairs.csv`` compares each candidate landmark set
of ``models.convert.align_template`` in two ways, on images of folds 1-8 (folds 9-10 are refused):

1. geometry: how far our chip lies from dlib's own chip for the same image (mean displacement of a
   grid of chip points, in chip pixels), with the template measured on packaged faces and, as a
   bound, with a template fitted on these very images ("oracle");
2. verification: dlib's ResNet run on our chips vs on dlib's chips (AUC, EER, TAR at FAR) on the pairs.

This is a build-time study (imports dlib); its result is the choice recorded in models/face/align.py.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from models.convert.align_template import (
    CANDIDATES,
    CHIP_PADDING,
    CHIP_SIZE,
    LandmarkSampler,
    Sample,
    apply,
    collect_packaged,
    derive,
)
from models.face.align import similarity_transform, warp_chip
from models.runtime.assets import dlib_model_file
from server.evaluation.metrics import verification_report
from server.evaluation.verify import PairRow, read_pairs

logger = logging.getLogger(__name__)

TEST_FOLDS = frozenset({9, 10})
# Chip points at which displacement is measured: a 5x5 grid over the central face area.
GRID = np.stack(np.meshgrid(np.linspace(30, 120, 5), np.linspace(30, 120, 5)), axis=-1).reshape(-1, 2)


def displacement(ours: npt.NDArray[np.float64], dlib_matrix: npt.NDArray[np.float64]) -> float:
    """Mean distance (chip px) between where a dlib-chip grid point lands in our chip and where it is."""
    inverse = np.asarray(cv2.invertAffineTransform(dlib_matrix), np.float64)
    moved = apply(ours, apply(inverse, GRID))
    return float(np.linalg.norm(moved - GRID, axis=1).mean())


class Study:
    """Per-image landmarks and descriptors for the candidates and the dlib reference."""

    def __init__(self, root: Path) -> None:
        import dlib

        self.root = root
        self.sampler = LandmarkSampler()
        self.resnet = dlib.face_recognition_model_v1(str(dlib_model_file(
            "dlib_face_recognition_resnet_model_v1.dat")))
        self._dlib = dlib
        self.samples: dict[str, Sample | None] = {}

    def load(self, rel: str) -> npt.NDArray[np.uint8]:
        """RGB image of a protocol path."""
        bgr = cv2.imread(str(self.root / rel))
        if bgr is None:
            raise FileNotFoundError(f"cannot read {self.root / rel}")
        return np.asarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), np.uint8)

    def sample(self, rel: str) -> Sample | None:
        """dlib transform + our landmarks for the image (None when either side finds no face)."""
        if rel not in self.samples:
            found = self.sampler.samples(rel, self.load(rel))
            self.samples[rel] = found[0] if found else None
        return self.samples[rel]

    def descriptor(self, chip: npt.NDArray[np.uint8]) -> npt.NDArray[np.float64]:
        """dlib's ResNet descriptor of a 150x150 chip, L2-normalised."""
        vec = np.asarray(self.resnet.compute_face_descriptor(chip), np.float64)
        out: npt.NDArray[np.float64] = vec / np.linalg.norm(vec)
        return out


def geometry(samples: list[Sample], packaged: list[Sample]) -> dict[str, dict[str, float]]:
    """Per candidate: mean/median displacement from dlib's chip with the packaged and oracle templates."""
    out: dict[str, dict[str, float]] = {}
    for key, (source, indices) in CANDIDATES.items():
        row: dict[str, float] = {}
        for label, template in (("packaged", derive(packaged, source, indices)),
                                ("oracle", derive(samples, source, indices))):
            errors = []
            for s in samples:
                pts = (s.keypoints if source == "keypoints" else s.mesh)[list(indices), :2]
                matrix, _ = similarity_transform(pts, template)
                errors.append(displacement(matrix, s.dlib_matrix))
            row[f"{label}_mean_px"] = round(float(np.mean(errors)), 3)
            row[f"{label}_median_px"] = round(float(np.median(errors)), 3)
        out[key] = row
    return out


def verify(study: Study, pairs: list[PairRow], packaged: list[Sample], keys: list[str],
           ) -> dict[str, dict[str, Any]]:
    """dlib ResNet verification figures with dlib's chips and with each candidate's chips."""
    paths = sorted({p for r in pairs for p in (r.path_a, r.path_b)})
    vectors: dict[str, dict[str, npt.NDArray[np.float64] | None]] = {k: {} for k in ["dlib", *keys]}
    templates = {k: derive(packaged, *CANDIDATES[k]) for k in keys}
    for n, rel in enumerate(paths):
        rgb = study.load(rel)
        rects = study.sampler.dlib.detector(rgb, 1)
        if len(rects):
            shape = study.sampler.dlib.predictor(rgb, rects[0])
            chip = np.asarray(study._dlib.get_face_chip(rgb, shape, CHIP_SIZE, CHIP_PADDING))
            vectors["dlib"][rel] = study.descriptor(chip)
        else:
            vectors["dlib"][rel] = None
        dets = study.sampler.detector.detect(rgb)
        mesh = study.sampler.mesh.landmarks(rgb, dets[0]) if dets else None
        for key in keys:
            source, indices = CANDIDATES[key]
            if not dets or mesh is None:
                vectors[key][rel] = None
                continue
            pts = (dets[0].keypoints if source == "keypoints" else mesh.points[:, :2])[list(indices)]
            matrix, _ = similarity_transform(pts, templates[key])
            vectors[key][rel] = study.descriptor(warp_chip(rgb, matrix))
        if n % 200 == 0:
            logger.info("verification: %d/%d images", n, len(paths))
    labels = np.array([r.same for r in pairs])
    out: dict[str, dict[str, Any]] = {}
    for key, vecs in vectors.items():
        scores = []
        for r in pairs:
            a, b = vecs[r.path_a], vecs[r.path_b]
            scores.append(float(a @ b) if a is not None and b is not None else float("-inf"))
        report = verification_report(np.array(scores), labels)
        out[key] = {**report.as_dict(), "fail_to_detect": sum(v is None for v in vecs.values())}
    return out


def main(argv: list[str] | None = None) -> None:
    """Run the study on folds 1-8 and print JSON."""
    parser = argparse.ArgumentParser(description="Alignment study on training folds.")
    parser.add_argument("--pairs", type=Path, required=True)
    parser.add_argument("--folds", default="1,2,3,4,5,6,7,8")
    parser.add_argument("--verify", nargs="*", default=[], help="Candidates to run through the ResNet.")
    parser.add_argument("--skip-geometry", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    folds = frozenset(int(f) for f in args.folds.split(","))
    if folds & TEST_FOLDS:
        parser.error("folds 9 and 10 are the test folds: never tune on them")
    pairs = read_pairs(args.pairs, folds)
    study = Study(args.pairs.parent)
    packaged = collect_packaged()
    paths = sorted({p for r in pairs for p in (r.path_a, r.path_b)})
    result: dict[str, Any] = {"folds": sorted(folds), "images": len(paths)}
    if not args.skip_geometry:
        samples = [s for s in (study.sample(p) for p in paths) if s is not None]
        result.update(both_found=len(samples), geometry=geometry(samples, packaged))
    if args.verify:
        result["verification"] = verify(study, pairs, packaged, args.verify)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
