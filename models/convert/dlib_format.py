"""Read dlib's DNN serialization format with numpy alone (dlib itself is never imported here).

The format, as written by dlib's ``serialize.h`` and ``dnn/core.h``:

* An integer is one control byte (low nibble: byte count, bit 0x80: negative) followed by that
  many little-endian magnitude bytes. Zero is ``01 00``.
* A float/double is a ``float_details`` pair of integers: an int64 mantissa and an int16 exponent,
  value = mantissa * 2**exponent (exponents 32000/32001/32002 mean +inf/-inf/NaN).
* A string is its length (integer) then the raw bytes; a bool is the ASCII character '0' or '1'.
* A ``resizable_tensor`` is version 2, then num_samples, k, nr, nc, then float32 little-endian
  values in NCHW order. An ``alias_tensor`` (a view into a layer's params) is version 1 + 4 dims.
* A network is a nest of templates. Every wrapper (``add_loss_layer``, ``add_layer``,
  ``add_tag_layer``, ``add_skip_layer``) writes its version *before* its subnetwork and an
  ``add_layer`` writes its layer details and bookkeeping *after* it. The file is therefore:
  the versions from the outermost wrapper inwards, the input layer, then the layer details from
  the innermost layer outwards. Tag and skip wrappers carry no details, and ``add_prev_`` does not
  store which tag it reads, so the topology comes from a spec (the C++ type) and the file supplies
  the weights; every field the file does state is checked against the spec.

This module holds the primitive reader and the parsed layer types; ``models.convert.dlib_parse``
walks a network file with them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]

# float_details' reserved exponents for the special values (dlib/float_details.h).
_EXP_INF: Final = 32000
_EXP_NINF: Final = 32001
_EXP_NAN: Final = 32002
_MAX_STRING: Final = 1 << 16  # layer headers are short; a huge length means a corrupt or foreign file
_MAX_TENSOR: Final = 1 << 28  # floats; the face ResNet's largest tensor is ~600k


class DlibFormatError(Exception):
    """The file is not a dlib DNN of the expected type, or it is truncated/corrupt."""


# --------------------------------------------------------------------------------------------
# Primitive reader


class DlibReader:
    """Sequential reader of dlib's primitive encodings over an in-memory buffer."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def _take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise DlibFormatError(f"truncated file: need {n} bytes for {what} at offset {self.pos}, "
                                  f"file has {len(self.data)}")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def read_int(self, what: str = "integer") -> int:
        """One integer (signed or unsigned: the sign lives in the control byte)."""
        control = self._take(1, what)[0]
        size = control & 0x0F
        if size == 0 or size > 8 or control & 0x70:
            raise DlibFormatError(f"bad integer control byte 0x{control:02x} for {what} at {self.pos - 1}")
        value = int.from_bytes(self._take(size, what), "little")
        return -value if control & 0x80 else value

    def read_float(self, what: str = "float") -> float:
        """One float/double stored as a (mantissa, exponent) pair."""
        mantissa = self.read_int(what)
        exponent = self.read_int(what)
        if exponent == _EXP_INF:
            return float("inf")
        if exponent == _EXP_NINF:
            return float("-inf")
        if exponent == _EXP_NAN:
            return float("nan")
        try:
            return math.ldexp(float(mantissa), exponent)
        except OverflowError:  # C's ldexp gives +-inf here, and so does dlib
            return math.copysign(math.inf, mantissa)

    def read_string(self, what: str = "string") -> str:
        """A length-prefixed byte string, decoded as ASCII."""
        length = self.read_int(what)
        if length > _MAX_STRING:
            raise DlibFormatError(f"implausible string length {length} for {what} at {self.pos}")
        try:
            return self._take(length, what).decode("ascii")
        except UnicodeDecodeError as exc:
            raise DlibFormatError(f"{what} at {self.pos - length} is not ASCII") from exc

    def read_bool(self, what: str = "bool") -> bool:
        """A bool written as the character '0' or '1'."""
        ch = self._take(1, what)
        if ch not in (b"0", b"1"):
            raise DlibFormatError(f"bad bool byte {ch!r} for {what} at {self.pos - 1}")
        return ch == b"1"

    def expect_version(self, allowed: tuple[int, ...], what: str) -> int:
        """Read an integer version and check it is one of ``allowed``."""
        version = self.read_int(what)
        if version not in allowed:
            raise DlibFormatError(f"{what}: version {version} not in {allowed} at offset {self.pos}")
        return version

    def read_tensor(self, what: str = "tensor") -> FloatArray:
        """A ``resizable_tensor``: shape (num_samples, k, nr, nc) of float32."""
        self.expect_version((2,), f"{what} (resizable_tensor)")
        dims = tuple(self.read_int(what) for _ in range(4))
        count = int(np.prod(dims, dtype=np.int64))
        if min(dims) < 0 or count > _MAX_TENSOR:
            raise DlibFormatError(f"{what}: implausible tensor shape {dims}")
        raw = self._take(4 * count, what)
        return np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(dims)

    def read_alias(self, what: str = "alias_tensor") -> tuple[int, int, int, int]:
        """An ``alias_tensor``: only the view's shape (its data lives in the layer's params)."""
        self.expect_version((1,), f"{what} (alias_tensor)")
        n, k, nr, nc = (self.read_int(what) for _ in range(4))
        return n, k, nr, nc


# --------------------------------------------------------------------------------------------
# Layers (the numbers a forward pass needs)


@dataclass(frozen=True)
class InputRGB:
    """``input_rgb_image[_sized]``: x = (pixel - mean[channel]) / 256, RGB order."""

    mean_rgb: tuple[float, float, float]
    rows: int
    cols: int
    scale: float = 256.0


@dataclass(frozen=True)
class Conv:
    """``con_``: filters (num_filters, k, nr, nc) cross-correlated with stride and zero padding."""

    filters: FloatArray
    bias: FloatArray | None
    stride: tuple[int, int]
    padding: tuple[int, int]


@dataclass(frozen=True)
class Affine:
    """``affine_`` (or a ``bn_`` read as one): y = gamma * x + beta per channel."""

    gamma: FloatArray
    beta: FloatArray


@dataclass(frozen=True)
class Relu:
    """``relu_``."""


@dataclass(frozen=True)
class Pool:
    """``max_pool_``/``avg_pool_``; size (0, 0) means the whole image (``avg_pool_everything``)."""

    kind: str  # "max" or "avg"
    size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]


@dataclass(frozen=True)
class Dense:
    """``fc_``: y = x @ weights (+ bias); weights are (num_inputs, num_outputs)."""

    weights: FloatArray
    bias: FloatArray | None


@dataclass(frozen=True)
class AddPrev:
    """``add_prev_<tag>``: current + the output of the nearest ``tag`` below, zero-extended to fit."""

    tag: int


@dataclass(frozen=True)
class Tag:
    """``add_tag_layer<id>``: remember the current output under ``id``."""

    tag: int


@dataclass(frozen=True)
class Skip:
    """``add_skip_layer<tag>``: continue from the output of the nearest ``tag`` below."""

    tag: int


@dataclass(frozen=True)
class LossMetric:
    """``loss_metric_``: training-only; inference returns the raw output of the layer below."""

    margin: float
    distance_threshold: float


Layer = Conv | Affine | Relu | Pool | Dense | AddPrev | Tag | Skip


@dataclass(frozen=True)
class DlibNetwork:
    """A parsed network: input normalisation and layers in forward (input -> output) order."""

    input: InputRGB
    layers: list[Layer]
    loss: LossMetric | None = None
    headers: list[str] = field(default_factory=list)

    def parameter_count(self) -> int:
        """Number of trained numbers (filters, biases, affine, fc)."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, Conv):
                total += layer.filters.size + (0 if layer.bias is None else layer.bias.size)
            elif isinstance(layer, Affine):
                total += layer.gamma.size + layer.beta.size
            elif isinstance(layer, Dense):
                total += layer.weights.size + (0 if layer.bias is None else layer.bias.size)
        return total


# --------------------------------------------------------------------------------------------
# The network spec: the C++ template, outermost first


@dataclass(frozen=True)
class SpecNode:
    """One wrapper of the C++ type: kind is loss|layer|tag|skip|input; ``layer`` names the details."""

    kind: str
    layer: str = ""
    tag: int = 0
    args: tuple[int, ...] = ()
