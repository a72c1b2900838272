"""Run a ``.tflite`` model through the first available backend: LiteRT, tflite-runtime, TensorFlow Lite.

``TFLiteModel`` hides quantization: callers pass and receive float32 arrays, and the
model quantizes inputs and dequantizes outputs with the scale/zero point stored in the file.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

logger = logging.getLogger(__name__)

# Tried in this order: LiteRT is the maintained successor and works with numpy 2;
# tflite-runtime 2.14 crashes on numpy 2 but is what older Pi images have; TF is server-only.
BACKENDS: tuple[tuple[str, str], ...] = (
    ("litert", "ai_edge_litert.interpreter"),
    ("tflite_runtime", "tflite_runtime.interpreter"),
    ("tensorflow", "tensorflow.lite"),
)


class RuntimeUnavailableError(Exception):
    """No TFLite backend could be imported."""


class ModelLoadError(Exception):
    """A ``.tflite`` file could not be loaded."""


class ModelInputError(ValueError):
    """An input array does not fit the model's input tensor."""


class _Interpreter(Protocol):
    def allocate_tensors(self) -> None: ...
    def get_input_details(self) -> list[dict[str, Any]]: ...
    def get_output_details(self) -> list[dict[str, Any]]: ...
    def set_tensor(self, index: int, value: npt.NDArray[Any]) -> None: ...
    def get_tensor(self, index: int) -> npt.NDArray[Any]: ...
    def invoke(self) -> None: ...


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """An input or output tensor: index, name, shape, dtype and affine quantization (scale 0 = float)."""

    index: int
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    scale: float
    zero_point: int

    @property
    def quantized(self) -> bool:
        """True for an integer tensor with a scale."""
        return self.scale != 0.0 and np.issubdtype(self.dtype, np.integer)


def _interpreter_factory(preferred: str | None = None) -> tuple[str, Callable[..., _Interpreter]]:
    """Return (backend name, Interpreter class) for the first importable backend."""
    errors = []
    for name, module_name in BACKENDS:
        if preferred is not None and name != preferred:
            continue
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            errors.append(f"{module_name}: {exc}")
            continue
        return name, module.Interpreter
    raise RuntimeUnavailableError(
        "no TFLite runtime found; install one with `pip install ai-edge-litert` ("
        + "; ".join(errors) + ")"
    )


def available_backend() -> str:
    """Name of the backend ``TFLiteModel`` would use."""
    return _interpreter_factory()[0]


def _tensor_info(detail: dict[str, Any]) -> TensorInfo:
    scale, zero_point = detail.get("quantization", (0.0, 0))
    return TensorInfo(
        index=int(detail["index"]),
        name=str(detail["name"]),
        shape=tuple(int(d) for d in detail["shape"]),
        dtype=np.dtype(detail["dtype"]),
        scale=float(scale),
        zero_point=int(zero_point),
    )


class TFLiteModel:
    """A loaded ``.tflite`` with float-in/float-out ``run``; a context manager, ``close()`` idempotent."""

    def __init__(self, path: Path | str, threads: int = 1, backend: str | None = None) -> None:
        self.path = Path(path)
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.backend, factory = _interpreter_factory(backend)
        try:
            self._interp: _Interpreter | None = factory(model_path=str(self.path), num_threads=threads)
            self._interp.allocate_tensors()
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadError(f"cannot load TFLite model {self.path}: {exc}") from exc
        self.inputs = tuple(_tensor_info(d) for d in self._interp.get_input_details())
        self.outputs = tuple(_tensor_info(d) for d in self._interp.get_output_details())
        logger.debug("loaded %s with %s (%d threads)", self.path.name, self.backend, threads)

    @property
    def input(self) -> TensorInfo:
        """The first (usually only) input tensor."""
        return self.inputs[0]

    def _live(self) -> _Interpreter:
        if self._interp is None:
            raise ModelLoadError(f"model {self.path.name} is closed")
        return self._interp

    @staticmethod
    def quantize(x: npt.NDArray[Any], info: TensorInfo) -> npt.NDArray[Any]:
        """Float array -> the tensor's dtype (affine quantization when the tensor is quantized)."""
        if info.quantized:
            limits = np.iinfo(info.dtype)
            q = np.round(np.asarray(x, np.float32) / info.scale) + info.zero_point
            out: npt.NDArray[Any] = np.clip(q, limits.min, limits.max).astype(info.dtype)
            return out
        out = np.asarray(x, dtype=info.dtype)
        return out

    @staticmethod
    def dequantize(q: npt.NDArray[Any], info: TensorInfo) -> npt.NDArray[np.float32]:
        """Tensor values -> float32 (affine dequantization when quantized)."""
        if info.quantized:
            return ((q.astype(np.float32) - info.zero_point) * info.scale).astype(np.float32)
        return np.asarray(q, dtype=np.float32)

    def run_all(self, *xs: npt.NDArray[Any]) -> list[npt.NDArray[np.float32]]:
        """Run with one float array per input; return every output as float32."""
        interp = self._live()
        if len(xs) != len(self.inputs):
            raise ModelInputError(f"{self.path.name} takes {len(self.inputs)} inputs, got {len(xs)}")
        for x, info in zip(xs, self.inputs, strict=True):
            if tuple(x.shape) != info.shape:
                raise ModelInputError(f"{self.path.name} input '{info.name}' wants shape {info.shape}, "
                                      f"got {tuple(x.shape)}")
            if not np.all(np.isfinite(x)):
                raise ModelInputError(f"{self.path.name} input '{info.name}' contains NaN or inf")
            interp.set_tensor(info.index, self.quantize(x, info))
        interp.invoke()
        return [self.dequantize(interp.get_tensor(o.index), o) for o in self.outputs]

    def run(self, x: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        """Run a single-input model and return its first output as float32."""
        return self.run_all(x)[0]

    def close(self) -> None:
        """Release the interpreter (safe to call twice)."""
        self._interp = None

    def __enter__(self) -> TFLiteModel:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
