"""A MiniFASNet that also outputs its pooled features: the input of the fine-tuned liveness head.

MiniFASNet ends with a global depthwise convolution (GDC) that pools the last feature map to one
``(1, 1, 1, C)`` vector, then a linear layer to 128 numbers and one to the 3 class logits. The trained
liveness head (``server.training.liveness``) reads the GDC vector, so the door must get it from the same
file it runs. :func:`with_feature_output` rewrites the ``.tflite`` flatbuffer so that the GDC tensor is a
second output, beside the unchanged logits: the same weights, the same operators, one extra output index.

Server-side (TensorFlow's flatbuffer tools); the door only loads the result with LiteRT.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.files import atomic_write_bytes

FEATURE_OUTPUT_NAME = "gdc_features"


class FeatureVariantError(Exception):
    """The model has no pooled ``(1, 1, 1, C)`` tensor to expose, or cannot be rewritten."""


def _flatbuffer_utils() -> Any:
    try:
        from tensorflow.lite.tools import flatbuffer_utils
    except ImportError as exc:  # the server extra brings TensorFlow
        raise FeatureVariantError(f"TensorFlow is needed to rewrite a .tflite file ({exc}); install the "
                                  "server extra") from exc
    return flatbuffer_utils


def pooled_tensor(model: Any) -> tuple[int, int]:
    """(index, channels) of the last op output shaped ``(1, 1, 1, C)``: the GDC pooling, before the FC."""
    graph = model.subgraphs[0]
    produced = {int(i) for op in graph.operators for i in op.outputs}
    best: tuple[int, int] | None = None
    for index in sorted(produced):
        shape = [int(d) for d in graph.tensors[index].shape]
        if len(shape) == 4 and shape[:3] == [1, 1, 1] and shape[3] >= 64:
            best = (index, shape[3])
    if best is None:
        raise FeatureVariantError("no pooled (1, 1, 1, C) tensor in the model: not a MiniFASNet")
    return best


def with_feature_output(src: Path, dst: Path) -> int:
    """Write ``src`` with its pooled features as a second output to ``dst``; return the feature width."""
    utils = _flatbuffer_utils()
    try:
        model = utils.read_model(str(src))
    except (OSError, ValueError, RuntimeError) as exc:
        raise FeatureVariantError(f"cannot read {src}: {exc}") from exc
    if len(model.subgraphs) != 1 or len(model.subgraphs[0].outputs) != 1:
        raise FeatureVariantError(f"{src.name}: expected one graph with one output (the class logits)")
    index, channels = pooled_tensor(model)
    graph = model.subgraphs[0]
    graph.outputs = [int(graph.outputs[0]), index]
    graph.tensors[index].name = FEATURE_OUTPUT_NAME.encode()
    dst.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(dst, bytes(utils.convert_object_to_bytearray(model)))
    return channels
