"""The two starting points: the dlib-converted embedder to fine-tune, and a compact student.

Both take what the product's pipeline produces and the device feeds its embedder: a 150x150x3 RGB
chip as float 0..255. The student resizes it to its own input (112 or 96) inside the graph, so a
trained student drops into the device pipeline and the TFLite export without any other change.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import keras

logger = logging.getLogger(__name__)

CHIP_SIZE = 150  # the product's aligned chip (dlib geometry)
EMBEDDING_DIM = 128
STUDENT_SIZES = (96, 112)
# MobileFaceNet bottleneck stages: (expansion t, channels c, repeats n, first stride s).
MOBILEFACENET_STAGES: tuple[tuple[int, int, int, int], ...] = (
    (2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1),
)
STEM_CHANNELS = 64
CONV_EXPAND_CHANNELS = 512  # the 1x1 conv before the global depthwise conv
# Width multiplier floor: channel counts never drop below this (keeps tiny test models valid).
MIN_CHANNELS = 8


class ModelBuildError(ValueError):
    """A model cannot be built from the given settings (or the teacher cannot be loaded)."""


@dataclass(frozen=True, slots=True)
class StudentSpec:
    """Size of the compact student: input side, width multiplier, and repeats per stage (None = paper)."""

    input_size: int = 112
    width: float = 1.0
    repeats: tuple[int, ...] | None = None
    embedding_dim: int = EMBEDDING_DIM
    # Not PReLU (MobileFaceNet's): LiteRT has no fast int8 PReLU kernel (measured 23 ms vs 2.6 ms at
    # 112/1.0). ReLU6's bounded range keeps int8 activation scales fine through the residual chain.
    activation: Literal["relu6", "relu", "prelu"] = "relu6"


def _ch(channels: int, width: float) -> int:
    return max(MIN_CHANNELS, round(channels * width / 8.0) * 8)


def _act(x: Any, kind: str, name: str) -> Any:
    if kind == "prelu":
        return keras.layers.PReLU(shared_axes=[1, 2], name=name)(x)
    return keras.layers.ReLU(max_value=6.0 if kind == "relu6" else None, name=name)(x)


def _conv_bn(x: Any, filters: int, kernel: int, stride: int, name: str, act: str | None) -> Any:
    x = keras.layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    return x if act is None else _act(x, act, f"{name}_act")


def _dw_bn(x: Any, stride: int, name: str, act: str) -> Any:
    x = keras.layers.DepthwiseConv2D(3, stride, padding="same", use_bias=False, name=f"{name}_dw")(x)
    x = keras.layers.BatchNormalization(name=f"{name}_dwbn")(x)
    return _act(x, act, f"{name}_dwact")


def _bottleneck(x: Any, expansion: int, out: int, stride: int, name: str, act: str) -> Any:
    """Inverted residual: 1x1 expand, 3x3 depthwise, linear 1x1 project, skip when shapes match."""
    in_ch = int(x.shape[-1])
    y = _conv_bn(x, in_ch * expansion, 1, 1, f"{name}_expand", act)
    y = _dw_bn(y, stride, name, act)
    y = _conv_bn(y, out, 1, 1, f"{name}_project", None)
    if stride == 1 and in_ch == out:
        y = keras.layers.Add(name=f"{name}_add")([x, y])
    return y


def build_student(spec: StudentSpec = StudentSpec()) -> keras.Model:
    """MobileFaceNet-style embedder: chip (150,150,3) 0..255 -> resize -> ... -> GDC -> unit 128-d."""
    if spec.input_size not in STUDENT_SIZES:
        raise ModelBuildError(f"student input must be one of {STUDENT_SIZES}, got {spec.input_size}")
    if not 0.0 < spec.width <= 2.0:
        raise ModelBuildError(f"width multiplier must be in (0, 2], got {spec.width}")
    repeats = spec.repeats or tuple(stage[2] for stage in MOBILEFACENET_STAGES)
    if len(repeats) != len(MOBILEFACENET_STAGES) or min(repeats) < 1:
        raise ModelBuildError(f"repeats must be {len(MOBILEFACENET_STAGES)} positive ints, got {repeats}")
    chip = keras.Input((CHIP_SIZE, CHIP_SIZE, 3), name="chip")
    x = keras.layers.Resizing(spec.input_size, spec.input_size, name="resize")(chip)
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="scale")(x)
    act = spec.activation
    x = _conv_bn(x, _ch(STEM_CHANNELS, spec.width), 3, 2, "stem", act)
    x = _dw_bn(x, 1, "stem", act)
    for stage, ((t, c, _, s), n) in enumerate(zip(MOBILEFACENET_STAGES, repeats, strict=True)):
        for i in range(n):
            x = _bottleneck(x, t, _ch(c, spec.width), s if i == 0 else 1, f"stage{stage}_b{i}", act)
    x = _conv_bn(x, _ch(CONV_EXPAND_CHANNELS, spec.width), 1, 1, "expand", act)
    # Global depthwise conv: a learned spatial weighting instead of average pooling (MobileFaceNet's GDC).
    side = int(x.shape[1])
    x = keras.layers.DepthwiseConv2D(side, 1, padding="valid", use_bias=False, name="gdc")(x)
    x = keras.layers.BatchNormalization(name="gdc_bn")(x)
    x = keras.layers.Conv2D(spec.embedding_dim, 1, use_bias=False, name="linear")(x)
    x = keras.layers.BatchNormalization(name="linear_bn")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    out = keras.layers.UnitNormalization(name="embedding")(x)
    return keras.Model(chip, out, name=f"student_{spec.input_size}_w{spec.width:g}")


def load_dlib_teacher() -> keras.Model:
    """The dlib ResNet rebuilt in Keras from the packaged .dat (same I/O as the device embedder)."""
    try:
        from models.convert.artifacts import EmbedderBuild
        from models.convert.dlib_format import DlibFormatError
        from models.runtime.assets import AssetNotFoundError
    except ModuleNotFoundError as exc:
        raise ModelBuildError(f"the dlib converter is not available: {exc}") from exc
    try:
        model: keras.Model = EmbedderBuild(None).keras_model()
    except (AssetNotFoundError, DlibFormatError, OSError) as exc:
        raise ModelBuildError(f"cannot rebuild the dlib embedder in Keras: {exc}") from exc
    return model


def trainable_blocks(model: keras.Model) -> list[list[keras.layers.Layer]]:
    """Layers grouped into blocks in graph order; a block ends at each residual Add (or the output)."""
    blocks: list[list[keras.layers.Layer]] = [[]]
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        blocks[-1].append(layer)
        if isinstance(layer, keras.layers.Add):
            blocks.append([])
    return [b for b in blocks if b]


def freeze_blocks(model: keras.Model, n_frozen: int) -> int:
    """Freeze the first ``n_frozen`` blocks (see ``trainable_blocks``); return the number of blocks."""
    blocks = trainable_blocks(model)
    if not 0 <= n_frozen < len(blocks):
        raise ModelBuildError(f"can freeze 0..{len(blocks) - 1} of {len(blocks)} blocks, asked {n_frozen}")
    for i, block in enumerate(blocks):
        for layer in block:
            layer.trainable = i >= n_frozen
    logger.info("froze %d of %d blocks of %s", n_frozen, len(blocks), model.name)
    return len(blocks)


def finetune_start(n_frozen: int) -> keras.Model:
    """The dlib teacher with its first ``n_frozen`` blocks frozen, ready to fine-tune."""
    model = load_dlib_teacher()
    freeze_blocks(model, n_frozen)
    return model


def split_frozen(model: keras.Model, n_frozen: int) -> tuple[keras.Model, keras.Model]:
    """(frozen trunk, trainable rest) cut after block ``n_frozen``; the rest shares the model's layers.

    The trunk's outputs can be computed once and cached, so fine-tuning only pays for the trainable
    blocks. Training the rest updates ``model`` itself (same layer objects). The cut must be a real
    cut (no tensor from the trunk skips past it): true at a residual Add of a chain of blocks.
    """
    blocks = trainable_blocks(model)
    if not 0 < n_frozen < len(blocks):
        raise ModelBuildError(f"can split after 1..{len(blocks) - 1} of {len(blocks)} blocks, "
                              f"asked {n_frozen}")
    boundary = blocks[n_frozen - 1][-1].output
    trunk = keras.Model(model.input, boundary, name=f"{model.name}_trunk")
    new_input = keras.Input(tuple(boundary.shape[1:]), name="trunk_features")
    mapped: dict[int, Any] = {id(boundary): new_input}
    for op in model.operations:
        if isinstance(op, keras.layers.InputLayer):
            continue
        for node in list(op._inbound_nodes):
            wanted = node.arguments.keras_tensors
            if node.outputs and id(node.outputs[0]) in mapped:
                continue
            if wanted and all(id(t) in mapped for t in wanted):
                args, kwargs = node.arguments.fill_in(mapped)
                outs = keras.tree.flatten(op(*args, **kwargs))
                for old, new in zip(node.outputs, outs, strict=True):
                    mapped[id(old)] = new
    if id(model.outputs[0]) not in mapped:
        raise ModelBuildError(f"block {n_frozen} is not a clean cut of {model.name}: a skip crosses it")
    rest = keras.Model(new_input, mapped[id(model.outputs[0])], name=f"{model.name}_rest")
    freeze_blocks(model, n_frozen)
    return trunk, rest


def copy_weights_by_name(source: keras.Model, target: keras.Model) -> int:
    """Copy the weights of every layer of ``source`` into the layer of the same name in ``target``."""
    copied = 0
    names = {layer.name for layer in target.layers}
    for layer in source.layers:
        if layer.weights and layer.name in names:
            target.get_layer(layer.name).set_weights(layer.get_weights())
            copied += 1
    return copied
