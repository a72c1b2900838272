"""BlazeFace face detection (MediaPipe short- and full-range models) with our own SSD decoding.

The model sees a letterboxed, [-1, 1]-normalised square. Each anchor predicts a box
(centre offset, width, height) and six keypoints as offsets in input pixels relative to the
anchor centre, plus one logit. We clip and sigmoid the logits, keep scores above the threshold,
merge overlapping boxes with MediaPipe's weighted NMS and map everything back to image pixels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import cv2
import numpy as np
import numpy.typing as npt

from core.config import DetectorConfig
from core.types import Detection, ImageArray
from models.face.image import as_rgb
from models.runtime.interpreter import TFLiteModel

logger = logging.getLogger(__name__)

NUM_KEYPOINTS = 6
# Logits are clipped before the sigmoid as MediaPipe does (score_clipping_thresh = 100);
# beyond +-80 float32 exp() saturates anyway, so the clip only protects against overflow warnings.
RAW_SCORE_CLIP = 80.0


@dataclass(frozen=True, slots=True)
class BlazeFaceSpec:
    """What differs between the BlazeFace variants: model, input size and SSD anchor layout."""

    manifest_name: str
    asset_file: str
    input_size: int
    strides: tuple[int, ...]
    # MediaPipe's interpolated_scale_aspect_ratio = 1.0 adds a second anchor per cell;
    # with fixed_anchor_size both anchors share the centre, so only the count matters.
    anchors_per_cell: int


SPECS: dict[str, BlazeFaceSpec] = {
    "short": BlazeFaceSpec("blazeface-short", "face_detection_short_range.tflite", 128, (8, 16, 16, 16), 2),
    "full": BlazeFaceSpec("blazeface-full", "face_detection_full_range.tflite", 192, (4,), 1),
}


def ssd_anchors(input_size: int, strides: tuple[int, ...], anchors_per_cell: int) -> npt.NDArray[np.float32]:
    """Anchor centres (N, 2) in [0, 1] following MediaPipe's SsdAnchorsCalculator (fixed size 1x1).

    Consecutive layers with the same stride share one feature map, so their anchors are emitted
    together per cell (e.g. short range: 16x16x2 at stride 8, then 8x8x6 for the three stride-16 layers).
    """
    centres: list[npt.NDArray[np.float32]] = []
    layer = 0
    while layer < len(strides):
        stride = strides[layer]
        repeats = 0
        while layer < len(strides) and strides[layer] == stride:
            repeats += anchors_per_cell
            layer += 1
        cells = int(np.ceil(input_size / stride))
        grid = (np.arange(cells, dtype=np.float32) + 0.5) / cells
        ys, xs = np.meshgrid(grid, grid, indexing="ij")
        per_cell = np.stack([xs.ravel(), ys.ravel()], axis=1)
        centres.append(np.repeat(per_cell, repeats, axis=0))
    return np.concatenate(centres, axis=0).astype(np.float32)


def iou_one_to_many(box: npt.NDArray[np.float32], boxes: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Intersection over union of one (4,) x0,y0,x1,y1 box with each of (N, 4) boxes."""
    ix0 = np.maximum(box[0], boxes[:, 0])
    iy0 = np.maximum(box[1], boxes[:, 1])
    ix1 = np.minimum(box[2], boxes[:, 2])
    iy1 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(ix1 - ix0, 0, None) * np.clip(iy1 - iy0, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - inter
    out: npt.NDArray[np.float32] = np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0).astype(
        np.float32)
    return out


def weighted_nms(boxes: npt.NDArray[np.float32], keypoints: npt.NDArray[np.float32],
                 scores: npt.NDArray[np.float32], iou_threshold: float,
                 ) -> list[tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], float]]:
    """MediaPipe-style weighted NMS: each cluster (IoU >= threshold with its best box) is replaced by the
    score-weighted mean of its boxes and keypoints, keeping the best score. Returns best-first tuples."""
    order = np.argsort(-scores, kind="stable")
    remaining = order
    merged: list[tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], float]] = []
    while remaining.size:
        best = remaining[0]
        overlaps = iou_one_to_many(boxes[best], boxes[remaining])
        members = remaining[overlaps >= iou_threshold]
        members = members if members.size else remaining[:1]
        weights = scores[members] / float(scores[members].sum())
        box = (boxes[members] * weights[:, None]).sum(axis=0).astype(np.float32)
        kps = (keypoints[members] * weights[:, None, None]).sum(axis=0).astype(np.float32)
        merged.append((box, kps, float(scores[best])))
        remaining = remaining[overlaps < iou_threshold]
        if best in remaining:  # degenerate box (zero area): drop it explicitly
            remaining = remaining[remaining != best]
    return merged


@dataclass(frozen=True, slots=True)
class Letterbox:
    """How an image was fitted into the model's square: scale and padding in input pixels."""

    scale_x: float
    scale_y: float
    pad_x: float
    pad_y: float

    def to_image(self, points: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Map (..., 2) input-pixel coordinates back to image pixels."""
        pad = np.array([self.pad_x, self.pad_y], np.float32)
        out = (points - pad) / np.array([self.scale_x, self.scale_y], np.float32)
        return out.astype(np.float32)


def letterbox(rgb: ImageArray, size: int) -> tuple[npt.NDArray[np.float32], Letterbox]:
    """Resize keeping the aspect ratio, pad to size x size (centred), normalise to [-1, 1]."""
    height, width = rgb.shape[:2]
    scale = size / max(height, width)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(rgb, (new_w, new_h), interpolation=interp)
    pad_x, pad_y = (size - new_w) // 2, (size - new_h) // 2
    canvas = np.zeros((size, size, 3), np.float32)
    canvas[pad_y:pad_y + new_h, pad_x:pad_x + new_w] = resized.astype(np.float32) / 127.5 - 1.0
    if pad_x or pad_y:  # padding is black in the original image, i.e. -1 after normalisation
        mask = np.ones((size, size), bool)
        mask[pad_y:pad_y + new_h, pad_x:pad_x + new_w] = False
        canvas[mask] = -1.0
    return canvas[None], Letterbox(new_w / width, new_h / height, float(pad_x), float(pad_y))


class BlazeFaceDetector:
    """BlazeFace on LiteRT: ``detect(rgb)`` returns faces best-first; a context manager."""

    def __init__(self, model_path: Path, variant: str = "short", cfg: DetectorConfig | None = None,
                 threads: int = 1) -> None:
        if variant not in SPECS:
            raise ValueError(f"unknown BlazeFace variant '{variant}' (known: {sorted(SPECS)})")
        self.spec = SPECS[variant]
        self.cfg = cfg if cfg is not None else DetectorConfig(variant=variant)
        self.model = TFLiteModel(model_path, threads=threads)
        expected = (1, self.spec.input_size, self.spec.input_size, 3)
        if self.model.input.shape != expected:
            self.model.close()
            raise ValueError(f"{model_path} input is {self.model.input.shape}, expected {expected} "
                             f"for BlazeFace {variant}")
        self.anchors = ssd_anchors(self.spec.input_size, self.spec.strides, self.spec.anchors_per_cell)

    def _raw(self, tensor: npt.NDArray[np.float32],
             ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """Run the model; return regressors (N, 16) and logits (N,), whichever order the outputs have."""
        outputs = self.model.run_all(tensor)
        regs = next(o for o in outputs if o.shape[-1] == 4 + 2 * NUM_KEYPOINTS)
        logits = next(o for o in outputs if o.shape[-1] == 1)
        return regs.reshape(-1, 4 + 2 * NUM_KEYPOINTS), logits.reshape(-1)

    def decode(self, regs: npt.NDArray[np.float32], logits: npt.NDArray[np.float32],
               ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """Raw outputs -> (boxes (M,4), keypoints (M,6,2), scores (M,)) above threshold, in input pixels."""
        scores = 1.0 / (1.0 + np.exp(-np.clip(logits, -RAW_SCORE_CLIP, RAW_SCORE_CLIP)))
        keep = scores >= self.cfg.score_threshold
        size = float(self.spec.input_size)
        centres = self.anchors[keep] * size
        reg = regs[keep]
        cx, cy = centres[:, 0] + reg[:, 0], centres[:, 1] + reg[:, 1]
        half_w, half_h = reg[:, 2] / 2.0, reg[:, 3] / 2.0
        boxes = np.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=1).astype(np.float32)
        kps = (reg[:, 4:].reshape(-1, NUM_KEYPOINTS, 2) + centres[:, None, :]).astype(np.float32)
        return boxes, kps, scores[keep].astype(np.float32)

    def detect(self, rgb: ImageArray) -> list[Detection]:
        """Faces in an RGB image, best score first, with boxes and keypoints in image pixels."""
        image = as_rgb(rgb)
        tensor, box = letterbox(image, self.spec.input_size)
        regs, logits = self._raw(tensor)
        boxes, kps, scores = self.decode(regs, logits)
        height, width = image.shape[:2]
        detections = []
        for merged_box, merged_kps, score in weighted_nms(boxes, kps, scores, self.cfg.nms_iou):
            corners = box.to_image(merged_box.reshape(2, 2)).ravel()
            x0, y0 = float(np.clip(corners[0], 0, width)), float(np.clip(corners[1], 0, height))
            x1, y1 = float(np.clip(corners[2], 0, width)), float(np.clip(corners[3], 0, height))
            if x1 - x0 < self.cfg.min_face_px or y1 <= y0:
                continue
            detections.append(Detection((x0, y0, x1, y1), box.to_image(merged_kps), score))
        logger.debug("detected %d face(s)", len(detections))
        return detections

    def close(self) -> None:
        """Release the interpreter (safe to call twice)."""
        self.model.close()

    def __enter__(self) -> BlazeFaceDetector:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
