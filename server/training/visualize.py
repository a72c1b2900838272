"""Zeiler & Fergus-style unit visualisation: for K units of a layer, the 9 image patches that excite it most.

For every image we take each unit's strongest spatial response and its position; a unit's top 9 are the
9 images with the largest such response (one patch per image, so one face cannot fill a row). The patch
is that position's receptive field in the input chip. We measure the receptive field instead of deriving
it from strides and kernels, so it works for any graph (dlib's residual net, the student): the gradient of
the centre unit with respect to the input, summed over a few inputs, is non-zero on its receptive field.
The theoretical field of a deep unit covers the whole chip while most of its gradient sits near the
centre, so we crop the *effective* field: the smallest square holding ``RF_MASS`` of the gradient.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import keras
import numpy as np
import numpy.typing as npt
import tensorflow as tf

from core.files import atomic_write_bytes

logger = logging.getLogger(__name__)

TOP_PER_UNIT = 9
RF_MASS = 0.8  # share of the input-gradient mass inside the effective field (Luo et al. 2016 call it ERF)
RF_PROBES = 8  # inputs whose gradients are summed to find the field (ReLUs switch parts of it off)
PATCH_PX = 40  # each patch is drawn at this size in the grid
BATCH = 32
FIG_DPI = 80  # keeps an 8-unit grid well under 300 KB


class VisualizeError(ValueError):
    """Bad layer, unit count or image set."""


@dataclass(frozen=True, slots=True)
class Field:
    """Receptive field of a unit: size (h, w) in input pixels and the layer's effective stride."""

    height: int
    width: int
    stride_y: float
    stride_x: float


def layer_names(model: keras.Model) -> list[str]:
    """Names of the layers with a spatial (H, W, C) output, in graph order."""
    return [layer.name for layer in model.layers
            if not isinstance(layer, keras.layers.InputLayer) and len(layer.output.shape) == 4]


def feature_model(model: keras.Model, layer: str) -> keras.Model:
    """Model from the input to ``layer``'s output; VisualizeError for unknown or non-spatial layers."""
    if layer not in layer_names(model):
        raise VisualizeError(f"layer {layer!r} is not a spatial layer of {model.name}; "
                             f"choose one of: {', '.join(layer_names(model))}")
    return keras.Model(model.input, model.get_layer(layer).output)


def receptive_field(features: keras.Model, seed: int = 0) -> Field:
    """Effective receptive field of the centre position (see module doc)."""
    in_h, in_w = (int(d) for d in features.input.shape[1:3])
    out_h, out_w = (int(d) for d in features.output.shape[1:3])
    rng = np.random.default_rng(seed)
    probes = tf.constant(rng.uniform(0, 255, (RF_PROBES, in_h, in_w, 3)).astype(np.float32))
    with tf.GradientTape() as tape:
        tape.watch(probes)
        out = features(probes, training=False)
        centre = tf.reduce_sum(out[:, out_h // 2, out_w // 2, :])
    grad = np.abs(tape.gradient(centre, probes).numpy()).sum(axis=(0, 3))
    if not np.any(grad > 0):
        raise VisualizeError("the layer's centre unit has no gradient to the input (dead probe)")
    # Smallest square around the gradient's centre of mass that holds RF_MASS of its total.
    yy, xx = np.mgrid[:in_h, :in_w]
    total = grad.sum()
    cy, cx = (grad * yy).sum() / total, (grad * xx).sum() / total
    dist = np.maximum(np.abs(yy - cy), np.abs(xx - cx)).ravel()
    order = np.argsort(dist)
    cumulative = np.cumsum(grad.ravel()[order]) / total
    side = int(2 * dist[order][int(np.searchsorted(cumulative, RF_MASS))] + 1)
    return Field(min(side, in_h), min(side, in_w), in_h / out_h, in_w / out_w)


def inside_mask(out_h: int, out_w: int, field: Field, in_h: int, in_w: int) -> npt.NDArray[np.bool_]:
    """(out_h, out_w) positions whose whole field lies inside the input (all of them if none does).

    Without it, early units that detect edges pick the chip's border, where the field is half padding.
    """
    cy = (np.arange(out_h) + 0.5) * field.stride_y
    cx = (np.arange(out_w) + 0.5) * field.stride_x
    ok_y = (cy - field.height / 2 >= 0) & (cy + field.height / 2 <= in_h)
    ok_x = (cx - field.width / 2 >= 0) & (cx + field.width / 2 <= in_w)
    mask: npt.NDArray[np.bool_] = ok_y[:, None] & ok_x[None, :]
    return mask if mask.any() else np.ones((out_h, out_w), bool)


def strongest(features: keras.Model, images: npt.NDArray[Any], field: Field,
              ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Per image and unit: the max response (N, C) over allowed positions and its flat index (N, C)."""
    out_h, out_w = (int(d) for d in features.output.shape[1:3])
    allowed = inside_mask(out_h, out_w, field, int(images.shape[1]), int(images.shape[2])).reshape(-1)
    values, where = [], []
    for start in range(0, len(images), BATCH):
        acts = features.predict(np.asarray(images[start:start + BATCH], np.float32), verbose=0)
        flat = acts.reshape(acts.shape[0], -1, acts.shape[-1])
        flat[:, ~allowed, :] = -np.inf
        where.append(flat.argmax(axis=1))
        values.append(flat.max(axis=1))
    return np.concatenate(values).astype(np.float32), np.concatenate(where)


def choose_units(values: npt.NDArray[np.float32], k: int, pick: Literal["top", "first"]) -> list[int]:
    """K units: the most active on average over the images ("top") or simply the first K."""
    channels = values.shape[1]
    if not 1 <= k <= channels:
        raise VisualizeError(f"--units must be in 1..{channels} for this layer, got {k}")
    if pick == "first":
        return list(range(k))
    return [int(u) for u in np.argsort(-values.mean(axis=0))[:k]]


def crop(image: npt.NDArray[np.uint8], cy: float, cx: float, field: Field) -> npt.NDArray[np.uint8]:
    """The field-sized patch centred at (cy, cx), zero-padded outside the image, resized to PATCH_PX."""
    pad = max(field.height, field.width)
    padded = cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(0, 0, 0))
    y0 = round(cy - field.height / 2) + pad
    x0 = round(cx - field.width / 2) + pad
    patch = padded[y0:y0 + field.height, x0:x0 + field.width]
    return np.asarray(cv2.resize(patch, (PATCH_PX, PATCH_PX), interpolation=cv2.INTER_AREA), np.uint8)


def unit_patches(model: keras.Model, layer: str, images: npt.NDArray[np.uint8], k: int,
                 pick: Literal["top", "first"] = "top",
                 ) -> tuple[list[int], list[list[npt.NDArray[np.uint8]]], Field]:
    """(unit ids, per unit its top-9 patches, receptive field) for ``layer``."""
    if len(images) < TOP_PER_UNIT:
        raise VisualizeError(f"need at least {TOP_PER_UNIT} images, got {len(images)}")
    features = feature_model(model, layer)
    field = receptive_field(features)
    values, where = strongest(features, images, field)
    out_w = int(features.output.shape[2])
    units = choose_units(values, k, pick)
    rows = []
    for unit in units:
        best = np.argsort(-values[:, unit])[:TOP_PER_UNIT]
        patches = []
        for i in best:
            py, px = divmod(int(where[i, unit]), out_w)
            patches.append(crop(images[i], (py + 0.5) * field.stride_y, (px + 0.5) * field.stride_x, field))
        rows.append(patches)
    return units, rows, field


def render(units: list[int], rows: list[list[npt.NDArray[np.uint8]]], title: str, out: Path) -> Path:
    """Write the K x 9 grid as a PNG (matplotlib, Agg)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), TOP_PER_UNIT, figsize=(TOP_PER_UNIT * 0.62, len(rows) * 0.66 + 0.35),
                             squeeze=False)
    for r, (unit, patches) in enumerate(zip(units, rows, strict=True)):
        for c, patch in enumerate(patches):
            ax = axes[r][c]
            ax.imshow(patch)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(f"u{unit}", rotation=0, labelpad=12, fontsize=7, va="center")
    fig.suptitle(title, fontsize=8)
    fig.subplots_adjust(wspace=0.04, hspace=0.06, left=0.08, right=0.99, bottom=0.01, top=0.93)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=FIG_DPI)
    plt.close(fig)
    atomic_write_bytes(out, buffer.getvalue())
    return out


def visualize(model: keras.Model, layer: str, images: npt.NDArray[np.uint8], k: int, out: Path,
              pick: Literal["top", "first"] = "top") -> dict[str, Any]:
    """Compute and write the grid; return a JSON-ready summary."""
    units, rows, field = unit_patches(model, layer, images, k, pick)
    title = (f"{model.name} / {layer}: top-{TOP_PER_UNIT} patches of {len(units)} units "
             f"(effective field {field.height}x{field.width} px of {images.shape[1]})")
    render(units, rows, title, out)
    logger.info("wrote %s", out)
    return {"out": str(out), "layer": layer, "units": units, "field_px": [field.height, field.width],
            "images": len(images)}
