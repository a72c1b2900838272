"""Keras -> TFLite export (float32 and full-integer int8) and the checks that go into the manifest.

The int8 model is fully integer: int8 weights (per output channel) and int8 activations, a uint8
input (raw 0..255 pixels; calibration pins its scale to 1 and zero point to 0) and an int8 output
whose scale and zero point are recorded in the manifest. TensorFlow is imported lazily here.
"""

from __future__ import annotations

import logging
import statistics
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from models.runtime.interpreter import TFLiteModel
from models.runtime.manifest import QuantParams, TensorSpec

logger = logging.getLogger(__name__)

LATENCY_WARMUP_RUNS = 5
LATENCY_RUNS = 50  # median of this many single-image runs on one thread


class ExportError(Exception):
    """The TFLite converter failed or produced an unusable model."""


def _tf() -> Any:
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    return tf


def _converter(model: Any) -> Any:
    """A TFLite converter over a batch-1 concrete function of ``model`` (works for Keras 3 models)."""
    tf = _tf()
    shape = (1, *model.input_shape[1:])
    name = str(getattr(model.inputs[0], "name", "input")).split(":")[0]
    signature = [tf.TensorSpec(shape, tf.float32, name=name)]

    def call(x: Any) -> Any:
        return model(x, training=False)

    serve = tf.function(call, input_signature=signature)
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    # Keras 3 weights are resource variables: freeze them into constants, or the int8 calibrator
    # meets READ_VARIABLE ops it cannot run.
    frozen = convert_variables_to_constants_v2(serve.get_concrete_function())
    return tf.lite.TFLiteConverter.from_concrete_functions([frozen])


def export_float32(model: Any) -> bytes:
    """Serialize ``model`` as a float32 ``.tflite``."""
    try:
        data: bytes = _converter(model).convert()
    except Exception as exc:  # the converter raises many unrelated types
        raise ExportError(f"float32 TFLite conversion failed: {exc}") from exc
    return data


def export_int8(model: Any, calibration: npt.NDArray[np.float32]) -> bytes:
    """Serialize ``model`` as a full-integer ``.tflite`` calibrated on ``calibration`` (N, H, W, C)."""
    if calibration.ndim != 4 or calibration.shape[1:] != tuple(model.input_shape[1:]):
        raise ExportError(f"calibration data {calibration.shape} does not fit input {model.input_shape}")
    tf = _tf()
    converter = _converter(model)

    def representative() -> Iterator[list[npt.NDArray[np.float32]]]:
        for sample in calibration:
            yield [sample[None].astype(np.float32)]

    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.uint8
    converter.inference_output_type = tf.int8
    try:
        with warnings.catch_warnings():
            # The uint8 input's range comes from calibration (0..255), so no input stats are needed.
            warnings.filterwarnings("ignore", message="Statistics for quantized inputs")
            data: bytes = converter.convert()
    except Exception as exc:  # the converter raises many unrelated types
        raise ExportError(f"int8 TFLite conversion failed: {exc}") from exc
    return data


def tensor_specs(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The manifest's view of a ``.tflite``'s inputs and outputs (shape, dtype, quantization)."""
    with TFLiteModel(path, threads=1) as model:
        def spec(info: Any) -> TensorSpec:
            quant = QuantParams(scale=info.scale, zero_point=info.zero_point) if info.quantized else None
            return TensorSpec(name=info.name, shape=list(info.shape), dtype=str(info.dtype),
                              quantization=quant)

        return [spec(i) for i in model.inputs], [spec(o) for o in model.outputs]


def latency_ms(path: Path, runs: int = LATENCY_RUNS, seed: int = 0) -> float:
    """Median single-thread latency (ms) of one inference on a random input."""
    with TFLiteModel(path, threads=1) as model:
        info = model.input
        x = np.random.default_rng(seed).uniform(0, 255, size=info.shape).astype(np.float32)
        for _ in range(LATENCY_WARMUP_RUNS):
            model.run_all(x)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            model.run_all(x)
            times.append((time.perf_counter() - start) * 1000.0)
    return float(statistics.median(times))


def embed_all(path: Path, chips: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Run a one-image embedder over (N, 150, 150, 3) chips; returns (N, D) float32."""
    with TFLiteModel(path, threads=1) as model:
        return np.stack([model.run(chip[None]).reshape(-1) for chip in chips]).astype(np.float32)


def cosines(a: npt.NDArray[np.floating], b: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
    """Row-wise cosine similarity of two (N, D) arrays."""
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    norms = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    out: npt.NDArray[np.float64] = (a64 * b64).sum(axis=1) / np.maximum(norms, 1e-12)
    return out
