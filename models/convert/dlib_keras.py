"""Rebuild a parsed dlib network as a Keras 3 functional model (NHWC, float32).

The model takes a 150x150 RGB chip with values 0..255 (float32; what ``dlib.get_face_chip``
returns, cast to float) and returns dlib's raw 128-d descriptor (not re-normalised: dlib's own
``compute_face_descriptor`` output, whose norm is close to 1).

Exact rewrites, done while building (they change rounding only, never the function):

* Input normalisation ``(pixel - mean[c]) / 256`` is folded into the first convolution: that
  convolution has no padding, so every output sees whole windows and
  ``W' = W / 256``, ``b' = b - sum(W * mean) / 256``. The model therefore has no separate
  normalisation op and an int8 export can take raw uint8 pixels with scale 1.
* Every ``affine_`` that follows a convolution is folded into it: ``W'' = W' * gamma``,
  ``b'' = b' * gamma + beta`` (per output channel).
* ``add_prev_`` zero-extends the smaller operand (rows/cols at the bottom/right, extra channels at
  the end), as dlib's ``tt::add`` does when the shapes differ.

This module imports Keras (TensorFlow): import it only from build code, lazily.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from models.convert.dlib_format import (
    AddPrev,
    Affine,
    Conv,
    DlibFormatError,
    DlibNetwork,
    Layer,
    Pool,
    Relu,
    Skip,
    Tag,
)
from models.convert.dlib_format import Dense as DlibDense

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # the backend must be chosen (above) before this import

logger = logging.getLogger(__name__)

INPUT_NAME = "chip_rgb"
OUTPUT_NAME = "embedding"


class UnsupportedLayerError(DlibFormatError):
    """The network uses a layer configuration this converter does not rebuild."""


@keras.saving.register_keras_serializable(package="facegate")
class ZeroExtend(keras.layers.Layer):  # type: ignore[misc]
    """Zero-pad an NHWC tensor at the bottom/right/channel-end up to (rows, cols, channels)."""

    def __init__(self, rows: int, cols: int, channels: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rows, self.cols, self.channels = rows, cols, channels

    def call(self, x: Any) -> Any:
        """Pad ``x`` with zeros to the target shape."""
        _, h, w, c = x.shape
        pads = [[0, 0], [0, self.rows - h], [0, self.cols - w], [0, self.channels - c]]
        return keras.ops.pad(x, pads)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        """The target shape with the batch dimension kept."""
        return (input_shape[0], self.rows, self.cols, self.channels)

    def get_config(self) -> dict[str, Any]:
        """Keras config for saving."""
        config: dict[str, Any] = super().get_config()
        config.update(rows=self.rows, cols=self.cols, channels=self.channels)
        return config


@dataclass(frozen=True)
class _FoldedConv:
    kernel: npt.NDArray[np.float64]  # (kh, kw, in, out); folding is done in float64
    bias: npt.NDArray[np.float64]
    stride: tuple[int, int]
    padding: tuple[int, int]


def _start_conv(conv: Conv) -> _FoldedConv:
    kernel = conv.filters.astype(np.float64).transpose(2, 3, 1, 0)
    bias = (np.zeros(kernel.shape[-1]) if conv.bias is None else conv.bias.astype(np.float64))
    return _FoldedConv(kernel=kernel, bias=bias, stride=conv.stride, padding=conv.padding)


def _fold_input(conv: _FoldedConv, mean_rgb: tuple[float, float, float], scale: float) -> _FoldedConv:
    if conv.padding != (0, 0):
        raise UnsupportedLayerError("input normalisation can only fold into an unpadded first conv")
    mean = np.asarray(mean_rgb, np.float64)
    kernel = conv.kernel / scale
    bias = conv.bias - np.einsum("hwio,i->o", kernel, mean)
    return replace(conv, kernel=kernel, bias=bias)


def _fold_affine(conv: _FoldedConv, affine: Affine) -> _FoldedConv:
    gamma, beta = affine.gamma.astype(np.float64), affine.beta.astype(np.float64)
    if gamma.size == 0:  # a disabled affine_ is the identity
        return conv
    if gamma.shape != conv.bias.shape:
        raise UnsupportedLayerError(f"affine_ of {gamma.size} channels after a conv of {conv.bias.size}")
    return replace(conv, kernel=conv.kernel * gamma, bias=conv.bias * gamma + beta)


def _emit_conv(x: Any, conv: _FoldedConv, name: str) -> Any:
    kh, kw, _, filters = conv.kernel.shape
    if conv.padding == (0, 0):
        padding = "valid"
    elif conv.stride == (1, 1) and conv.padding == (kh // 2, kw // 2) and kh % 2 and kw % 2:
        padding = "same"  # symmetric for odd kernels at stride 1
    else:
        x = keras.layers.ZeroPadding2D(conv.padding, name=f"{name}_pad")(x)
        padding = "valid"
    layer = keras.layers.Conv2D(filters, (kh, kw), strides=conv.stride, padding=padding, name=name)
    y = layer(x)
    layer.set_weights([conv.kernel.astype(np.float32), conv.bias.astype(np.float32)])
    return y


def _emit_pool(x: Any, pool: Pool, name: str) -> Any:
    if pool.size == (0, 0):
        return keras.layers.GlobalAveragePooling2D(keepdims=True, name=name)(x)
    if pool.padding != (0, 0):
        raise UnsupportedLayerError(f"{pool.kind}_pool with padding {pool.padding} is not rebuilt")
    cls = keras.layers.MaxPooling2D if pool.kind == "max" else keras.layers.AveragePooling2D
    return cls(pool.size, strides=pool.stride, padding="valid", name=name)(x)


def _emit_add(a: Any, b: Any, name: str) -> Any:
    target = tuple(max(int(p), int(q)) for p, q in zip(a.shape[1:], b.shape[1:], strict=True))
    rows, cols, channels = target
    extended = []
    for index, t in enumerate((a, b)):
        if tuple(t.shape[1:]) != target:
            t = ZeroExtend(rows, cols, channels, name=f"{name}_extend{index}")(t)
        extended.append(t)
    return keras.layers.Add(name=name)(extended)


def _emit_dense(x: Any, dense: DlibDense, name: str) -> Any:
    x = keras.layers.Flatten(name=f"{name}_flatten")(x)
    layer = keras.layers.Dense(dense.weights.shape[1], use_bias=dense.bias is not None, name=name)
    y = layer(x)
    layer.set_weights([dense.weights] + ([] if dense.bias is None else [dense.bias]))
    return y


def build_keras_model(net: DlibNetwork, name: str = "dlib_face_resnet") -> Any:
    """A ``keras.Model`` computing ``net`` on 0..255 RGB NHWC float32 input."""
    rows, cols = net.input.rows, net.input.cols
    if rows <= 0 or cols <= 0:
        raise UnsupportedLayerError("the input layer has no fixed size (input_rgb_image_sized needed)")
    inputs = keras.Input((rows, cols, 3), dtype="float32", name=INPUT_NAME)
    x: Any = inputs
    tags: dict[int, Any] = {}
    pending: _FoldedConv | None = None
    input_folded = False
    counts: dict[str, int] = {}

    def label(kind: str) -> str:
        counts[kind] = counts.get(kind, 0) + 1
        return f"{kind}{counts[kind]}"

    def flush() -> None:
        nonlocal x, pending
        if pending is not None:
            x = _emit_conv(x, pending, label("conv"))
            pending = None

    layers: list[Layer] = list(net.layers)
    for index, layer in enumerate(layers):
        if isinstance(layer, Conv):
            flush()
            pending = _start_conv(layer)
            if not input_folded:
                pending = _fold_input(pending, net.input.mean_rgb, net.input.scale)
                input_folded = True
            continue
        if isinstance(layer, Affine) and pending is not None:
            pending = _fold_affine(pending, layer)
            continue
        if not input_folded:
            raise UnsupportedLayerError(f"layer {index} ({type(layer).__name__}) precedes the first conv")
        flush()
        if isinstance(layer, Affine):
            raise UnsupportedLayerError(f"affine_ not after a conv (layer {index}) is not rebuilt")
        if isinstance(layer, Relu):
            x = keras.layers.ReLU(name=label("relu"))(x)
        elif isinstance(layer, Pool):
            x = _emit_pool(x, layer, label(f"{layer.kind}pool"))
        elif isinstance(layer, Tag):
            tags[layer.tag] = x
        elif isinstance(layer, Skip | AddPrev):
            if layer.tag not in tags:
                raise DlibFormatError(f"layer {index} reads tag{layer.tag}, which no layer below sets")
            x = tags[layer.tag] if isinstance(layer, Skip) else _emit_add(x, tags[layer.tag], label("add"))
        elif isinstance(layer, DlibDense):
            x = _emit_dense(x, layer, OUTPUT_NAME if index == len(layers) - 1 else label("fc"))
    flush()
    model = keras.Model(inputs, x, name=name)
    logger.info("built Keras model %s: %d layers, output %s", name, len(model.layers), model.output_shape)
    return model
