"""Passive liveness: two MiniFASNet CNNs (Minivision, Apache-2.0) on 80x80 BGR patches around the face.

Input specification (``../shared/models/minifasnet/README.md``, Minivision's ``CropImage``):

- the face box ``(x, y, w, h)`` is scaled by 2.7 (MiniFASNetV2) or 4.0 (MiniFASNetV1SE) about its centre,
  the scale first capped at ``min((H-1)/h, (W-1)/w, scale)`` so the patch fits the frame;
- a patch sticking out of the frame is shifted back inside (never padded), cut, and resized to 80x80
  with bilinear interpolation;
- pixels are BGR, 0-255 float32 with no normalisation; the output is 3 logits, softmax index 1 = genuine.

**Which box.** The models were trained on boxes from Minivision's own WIDER-FACE detector, which box the
face from the forehead to the chin and cheek to cheek, taller than wide. BlazeFace's box is square and
sits lower and wider, so feeding it as is shifts every patch. ``face_box`` maps a BlazeFace box to the
box of the face mesh's 468 landmarks (forehead, chin, face oval), with constants measured on CelebA
faces, a set no liveness figure is measured on (``facegate eval liveness-calibrate`` reports the effect).

**Score.** Each model runs on the patch and on its mirror image and the logits are averaged. The score is
either Minivision's mean softmax genuine probability (``head=None``), or, by default, a calibrated
logistic head on both models' logit margins (genuine minus each attack class): Minivision's two attack
classes carry different evidence (prints vs screens), which a plain mean of "genuine" throws away. The
head's five numbers come from ``facegate eval liveness-calibrate`` on several datasets at once.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import cv2
import numpy as np
import numpy.typing as npt

from core.types import Detection, ImageArray, LivenessCheck, LivenessVerdict
from models.runtime.interpreter import TFLiteModel
from models.runtime.manifest import ManifestError, load_manifest, verify_entry

if TYPE_CHECKING:
    from device.liveness.trained import TrainedHead

logger = logging.getLogger(__name__)

CHECK_NAME = "passive"
PATCH_SIZE = 80
GENUINE_CLASS = 1
MINIFASNET_ENV = "FACEGATE_MINIFASNET_DIR"
# Probabilities are clipped to [eps, 1-eps] before the logit (float32 softmax saturates at 1).
PROB_EPS = 1e-7
# BlazeFace box -> face-mesh box (Minivision's detector convention), in units of the BlazeFace box:
# centre shift (x, y) and size (width, height). Medians over 216 CelebA faces (IQR 0.03-0.06); the mesh box
# is 7% narrower, 4% taller and 5% higher than BlazeFace's. Measured on CelebA so that no liveness set
# tunes them.
FACE_BOX_SHIFT = (-0.004, -0.047)
FACE_BOX_SIZE = (0.928, 1.044)
# Logit margins the head reads, per model: genuine minus attack class 0, genuine minus attack class 2.
HEAD_FEATURES_PER_MODEL = 2


@dataclass(frozen=True, slots=True)
class PassiveModelSpec:
    """One MiniFASNet: its manifest name, the file name Minivision's conversion ships, and its patch scale."""

    manifest_name: str
    file_name: str
    scale: float


# Manifest names match models/convert (role "liveness"); file names are the float32 TFLite conversions.
PASSIVE_MODELS: tuple[PassiveModelSpec, ...] = (
    PassiveModelSpec("minifasnet-2.7", "2.7_80x80_MiniFASNetV2_float32.tflite", 2.7),
    PassiveModelSpec("minifasnet-4.0", "4_0_0_80x80_MiniFASNetV1SE_float32.tflite", 4.0),
)
SPECS_BY_NAME = {spec.manifest_name: spec for spec in PASSIVE_MODELS}
OBTAIN_HINT = (
    "download 2.7_80x80_MiniFASNetV2.pth and 4_0_0_80x80_MiniFASNetV1SE.pth from "
    "github.com/minivision-ai/Silent-Face-Anti-Spoofing (resources/anti_spoof_models) or their TFLite "
    "conversions, then run `facegate models build --minifasnet DIR`"
)


class PassiveModelError(Exception):
    """The MiniFASNet models are missing or do not have the expected shape."""


def patch_window(width: int, height: int, box: tuple[float, float, float, float],
                 scale: float) -> tuple[int, int, int, int]:
    """Inclusive window (x0, y0, x1, y1) of the scaled face patch, shifted inside the width x height frame."""
    x0, y0, x1, y1 = box
    box_w, box_h = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
    scale = min((height - 1) / box_h, (width - 1) / box_w, scale)
    new_w, new_h = box_w * scale, box_h * scale
    centre_x, centre_y = x0 + box_w / 2.0, y0 + box_h / 2.0
    left, top = centre_x - new_w / 2.0, centre_y - new_h / 2.0
    right, bottom = centre_x + new_w / 2.0, centre_y + new_h / 2.0
    if left < 0:
        right -= left
        left = 0.0
    if top < 0:
        bottom -= top
        top = 0.0
    if right > width - 1:
        left -= right - (width - 1)
        right = float(width - 1)
    if bottom > height - 1:
        top -= bottom - (height - 1)
        bottom = float(height - 1)
    return int(left), int(top), int(right), int(bottom)


def face_box(det: Detection) -> tuple[float, float, float, float]:
    """The face box Minivision's models expect (forehead to chin, cheek to cheek) from a BlazeFace box."""
    x0, y0, x1, y1 = det.box
    width, height = x1 - x0, y1 - y0
    centre_x = (x0 + x1) / 2.0 + FACE_BOX_SHIFT[0] * width
    centre_y = (y0 + y1) / 2.0 + FACE_BOX_SHIFT[1] * height
    half_w, half_h = FACE_BOX_SIZE[0] * width / 2.0, FACE_BOX_SIZE[1] * height / 2.0
    return centre_x - half_w, centre_y - half_h, centre_x + half_w, centre_y + half_h


def crop_patch(bgr: ImageArray, box: tuple[float, float, float, float], scale: float,
               size: int = PATCH_SIZE) -> npt.NDArray[np.float32]:
    """The (size, size, 3) BGR 0-255 float32 patch of ``box`` scaled by ``scale`` (Minivision's crop)."""
    height, width = bgr.shape[:2]
    left, top, right, bottom = patch_window(width, height, box, scale)
    patch = bgr[max(top, 0):bottom + 1, max(left, 0):right + 1]
    if patch.size == 0:
        raise PassiveModelError(f"empty liveness patch for box {box} in a {width}x{height} frame")
    return cv2.resize(patch, (size, size), interpolation=cv2.INTER_LINEAR).astype(np.float32)


def softmax(logits: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Numerically stable softmax over the last axis."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    out: npt.NDArray[np.float32] = (exp / exp.sum(axis=-1, keepdims=True)).astype(np.float32)
    return out


def logit(p: float) -> float:
    """log(p / (1 - p)), with p clipped away from 0 and 1."""
    q = min(max(p, PROB_EPS), 1.0 - PROB_EPS)
    return math.log(q / (1.0 - q))


def head_features(logits: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    """Per model (rows of ``logits``): genuine minus attack class 0, genuine minus attack class 2."""
    rows = np.asarray(logits, np.float64).reshape(-1, 3)
    margins = np.stack([rows[:, GENUINE_CLASS] - rows[:, 0], rows[:, GENUINE_CLASS] - rows[:, 2]], axis=1)
    out: npt.NDArray[np.float64] = margins.reshape(-1)
    return out


def head_score(logits: npt.NDArray[np.float32], head: Sequence[float]) -> float:
    """sigmoid(w . head_features(logits) + b) for ``head`` = (w..., b)."""
    features = head_features(logits)
    if len(head) != features.size + 1:
        raise PassiveModelError(f"the passive head has {len(head)} numbers; {features.size + 1} are needed "
                                f"for {logits.shape[0]} model(s)")
    z = float(np.dot(np.asarray(head[:-1], np.float64), features) + head[-1])
    return 1.0 / (1.0 + math.exp(-min(max(z, -80.0), 80.0)))


def passive_verdict(score: float, threshold: float, band: float) -> LivenessVerdict:
    """live at or above the threshold, spoof below it, uncertain within ``band`` logits of it."""
    distance = logit(score) - logit(threshold)
    if band > 0 and abs(distance) < band:
        return LivenessVerdict.UNCERTAIN
    return LivenessVerdict.LIVE if distance >= 0 else LivenessVerdict.SPOOF


def find_minifasnet_files(directory: Path) -> list[tuple[PassiveModelSpec, Path]]:
    """Locate the float32 MiniFASNet TFLite files in a plain folder (no manifest)."""
    found = []
    for spec in PASSIVE_MODELS:
        path = Path(directory) / spec.file_name
        if not path.is_file():
            raise PassiveModelError(f"{path} is missing: {OBTAIN_HINT}")
        found.append((spec, path))
    return found


def manifest_minifasnet_files(models_dir: Path, names: Sequence[str]) -> list[tuple[PassiveModelSpec, Path]]:
    """Locate and sha256-verify the named MiniFASNet entries of a model manifest."""
    try:
        manifest = load_manifest(Path(models_dir))
        found = []
        for name in names:
            if name not in SPECS_BY_NAME:
                raise PassiveModelError(f"unknown passive model '{name}' (known: {sorted(SPECS_BY_NAME)})")
            found.append((SPECS_BY_NAME[name], verify_entry(Path(models_dir), manifest.get(name))))
        return found
    except ManifestError as exc:
        raise PassiveModelError(f"passive liveness models unavailable: {exc}; {OBTAIN_HINT}") from exc


def resolve_minifasnet_files(models_dir: Path | None = None, minifasnet_dir: Path | None = None,
                             names: Sequence[str] = tuple(SPECS_BY_NAME),
                             ) -> list[tuple[PassiveModelSpec, Path]]:
    """Files from an explicit MiniFASNet folder, else ``$FACEGATE_MINIFASNET_DIR``, else the manifest."""
    folder = minifasnet_dir if minifasnet_dir is not None else os.environ.get(MINIFASNET_ENV)
    if folder:
        wanted = set(names)
        return [item for item in find_minifasnet_files(Path(folder)) if item[0].manifest_name in wanted]
    if models_dir is None:
        raise PassiveModelError(f"no models folder, MiniFASNet folder or ${MINIFASNET_ENV} given; "
                                f"{OBTAIN_HINT}")
    return manifest_minifasnet_files(models_dir, names)


class PassiveLiveness:
    """MiniFASNet ensemble: ``score(rgb, det)`` is the genuine probability in [0, 1]; a context manager.

    ``head`` (weights then bias, ``HEAD_FEATURES_PER_MODEL`` weights per model) fuses the models' logit
    margins; None = Minivision's mean softmax. ``trained`` (``device.liveness.trained``, owned and
    closed here), when given, gives the score instead: the promoted fine-tuned head. ``band`` is the
    half-width, in logit units, of the uncertain zone around ``threshold``: scores pile up near 0 and 1,
    so a band in probability units would be far too wide at a low threshold.
    """

    def __init__(self, files: Sequence[tuple[PassiveModelSpec, Path]], threshold: float = 0.5,
                 band: float = 0.0, threads: int = 1, head: Sequence[float] | None = None,
                 trained: TrainedHead | None = None) -> None:
        if not files:
            raise PassiveModelError("at least one MiniFASNet model is needed")
        if head is not None and len(head) != HEAD_FEATURES_PER_MODEL * len(files) + 1:
            raise PassiveModelError(f"the passive head has {len(head)} numbers; "
                                    f"{HEAD_FEATURES_PER_MODEL * len(files) + 1} are needed for "
                                    f"{len(files)} model(s)")
        self.threshold = threshold
        self.band = band
        self.head = tuple(head) if head is not None else None
        self.trained = trained
        self._trained_lock = threading.Lock()  # a bundle install swaps the head between two frames
        self.models: list[tuple[PassiveModelSpec, TFLiteModel]] = []
        try:
            for spec, path in files:
                model = TFLiteModel(path, threads=threads)
                self.models.append((spec, model))
                if model.input.shape != (1, PATCH_SIZE, PATCH_SIZE, 3):
                    raise PassiveModelError(f"{path.name} input is {model.input.shape}, "
                                            f"expected (1, {PATCH_SIZE}, {PATCH_SIZE}, 3)")
        except BaseException:
            self.close()
            raise
        logger.info("passive liveness: %s%s", ", ".join(spec.manifest_name for spec, _ in self.models),
                    " with the trained head" if trained is not None else "")

    def logits(self, rgb: ImageArray, det: Detection) -> npt.NDArray[np.float32]:
        """(models, 3) logits of the face ``det`` in an RGB frame: the mean over the patch and its mirror."""
        if not self.models:
            raise PassiveModelError("the passive liveness models are closed")
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        box = face_box(det)
        out = np.zeros((len(self.models), 3), np.float32)
        for row, (spec, model) in enumerate(self.models):
            patch = crop_patch(bgr, box, spec.scale)
            mirrored = np.ascontiguousarray(patch[:, ::-1])
            out[row] = (model.run(patch[None]).reshape(-1) + model.run(mirrored[None]).reshape(-1)) / 2.0
        return out

    def probabilities(self, rgb: ImageArray, det: Detection) -> npt.NDArray[np.float32]:
        """Mean of the models' softmax vectors (3 classes) for the face ``det`` in an RGB frame."""
        out: npt.NDArray[np.float32] = softmax(self.logits(rgb, det)).mean(axis=0).astype(np.float32)
        return out

    def score_logits(self, logits: npt.NDArray[np.float32]) -> float:
        """The score of precomputed ``logits`` (the head when set, else the mean softmax genuine class)."""
        if self.head is not None:
            return head_score(logits, self.head)
        return float(softmax(logits).mean(axis=0)[GENUINE_CLASS])

    def score(self, rgb: ImageArray, det: Detection) -> float:
        """Genuine probability in [0, 1] (higher = more live): the trained head when the bundle ships one,
        else the head (or mean softmax) on the MiniFASNet logits."""
        with self._trained_lock:
            if self.trained is not None:
                return self.trained.score(rgb, det)
        return self.score_logits(self.logits(rgb, det))

    def use_trained(self, trained: TrainedHead | None) -> None:
        """Swap the trained head (None: back to the MiniFASNet head); the old one is closed."""
        with self._trained_lock:
            old, self.trained = self.trained, trained
        if old is not None and old is not trained:
            old.close()
        logger.info("passive liveness now scores with %s",
                    "the trained head" if trained is not None else "the MiniFASNet head")

    def check(self, rgb: ImageArray, det: Detection) -> LivenessCheck:
        """Score and verdict (threshold with its uncertain band) as a LivenessCheck."""
        value = self.score(rgb, det)
        verdict = passive_verdict(value, self.threshold, self.band)
        scorer = " head=trained" if self.trained is not None else ""
        return LivenessCheck(CHECK_NAME, value, verdict, f"threshold={self.threshold:.4f}{scorer}")

    def close(self) -> None:
        """Release the interpreters (safe to call twice)."""
        for _, model in self.models:
            model.close()
        self.models = []
        with self._trained_lock:
            if self.trained is not None:
                self.trained.close()

    def __enter__(self) -> PassiveLiveness:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
