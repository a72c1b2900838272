"""dlib's serialization format: primitives, the real face ResNet file, and corrupt input."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models.convert.dlib_format import (
    Affine,
    Conv,
    Dense,
    DlibFormatError,
    DlibReader,
    Pool,
    SpecNode,
)
from models.convert.dlib_parse import parse_network
from models.convert.dlib_spec import face_resnet_spec
from models.runtime.assets import AssetNotFoundError, dlib_model_file


@pytest.fixture(scope="module")
def resnet_bytes() -> bytes:
    """The packaged dlib face ResNet file."""
    try:
        return dlib_model_file("dlib_face_recognition_resnet_model_v1.dat").read_bytes()
    except AssetNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize(("raw", "value"), [
    (b"\x01\x00", 0), (b"\x01\x02", 2), (b"\x02\x2c\x01", 300), (b"\x82\x2c\x01", -300),
    (b"\x81\x1c", -28), (b"\x08" + (2**63 - 1).to_bytes(8, "little"), 2**63 - 1),
])
def test_integers(raw: bytes, value: int) -> None:
    """Control byte (size | sign) then little-endian magnitude bytes."""
    reader = DlibReader(raw)
    assert reader.read_int() == value
    assert reader.pos == len(raw)


def test_float_string_bool_and_tensor() -> None:
    """Floats are (mantissa, exponent) pairs; strings length-prefixed; bools '0'/'1'; tensors NCHW f32."""
    values = np.arange(6, dtype="<f4")
    raw = (b"\x03\x0a\xd7\xa3\x81\x1c"                      # 0.04 as written in the dlib file
           + b"\x01\x03\x02\xf4\x7d"                        # 3 * 2**32244 is not special: exponent 32244
           + b"\x01\x00\x02\x00\x7d"                        # exponent 32000 = +inf
           + b"\x01\x04relu" + b"1" + b"0"
           + b"\x01\x02" + b"\x01\x01\x01\x02\x01\x03\x01\x01" + values.tobytes())
    reader = DlibReader(raw)
    assert reader.read_float() == pytest.approx(0.04, rel=1e-7)
    assert math.isinf(reader.read_float())  # 3 * 2**32244 overflows a double
    assert reader.read_float() == math.inf
    assert reader.read_string() == "relu"
    assert reader.read_bool() is True and reader.read_bool() is False
    tensor = reader.read_tensor()
    assert tensor.shape == (1, 2, 3, 1) and np.array_equal(tensor.ravel(), values)


@pytest.mark.parametrize(("raw", "kind"), [
    (b"", "int"), (b"\x00", "int"), (b"\x09" + b"\x00" * 9, "int"), (b"\x02\x01", "int"),
    (b"\x01\x05ab", "string"), (b"x", "bool"), (b"\x01\x03", "tensor"),
])
def test_bad_primitives_raise_domain_error(raw: bytes, kind: str) -> None:
    """Truncated data and bad control bytes raise DlibFormatError, never IndexError."""
    reader = DlibReader(raw)
    with pytest.raises(DlibFormatError):
        getattr(reader, f"read_{kind}")()


def test_real_resnet_structure(resnet_bytes: bytes) -> None:
    """The packaged model parses to dlib's ResNet-29: every byte read, shapes as in the C++ type."""
    net = parse_network(resnet_bytes, face_resnet_spec())
    convs = [layer for layer in net.layers if isinstance(layer, Conv)]
    assert len(convs) == 29
    assert sum(isinstance(layer, Affine) for layer in net.layers) == 29
    assert convs[0].filters.shape == (32, 3, 7, 7)
    assert convs[0].stride == (2, 2) and convs[0].padding == (0, 0)  # strided: no padding
    assert convs[1].padding == (1, 1)  # 3x3 stride 1: dlib pads k//2
    pools = [layer for layer in net.layers if isinstance(layer, Pool)]
    assert pools[0].kind == "max" and pools[0].size == (3, 3) and pools[0].padding == (0, 0)
    assert pools[-1].size == (0, 0)  # avg_pool_everything
    dense = net.layers[-1]
    assert isinstance(dense, Dense) and dense.weights.shape == (256, 128) and dense.bias is None
    assert net.input.mean_rgb == pytest.approx((122.782, 117.001, 104.298), abs=1e-4)
    assert (net.input.rows, net.input.cols) == (150, 150)
    assert net.parameter_count() == 5_614_592
    assert net.loss is not None and net.loss.distance_threshold == pytest.approx(0.6)


def test_truncated_or_mismatched_file_is_rejected(resnet_bytes: bytes) -> None:
    """Half a file, trailing garbage, or the wrong network type give a clear DlibFormatError."""
    spec = face_resnet_spec()
    with pytest.raises(DlibFormatError, match="truncated"):
        parse_network(resnet_bytes[: len(resnet_bytes) // 2], spec)
    with pytest.raises(DlibFormatError, match="unread bytes"):
        parse_network(resnet_bytes + b"\x00", spec)
    shorter = [node for i, node in enumerate(spec) if i not in range(3, 12)]  # drop alevel0's block
    with pytest.raises(DlibFormatError):
        parse_network(resnet_bytes, shorter)
    with pytest.raises(DlibFormatError, match="input"):
        parse_network(resnet_bytes, [SpecNode("loss"), SpecNode("layer", "fc")])


def test_light_imports_do_not_load_tensorflow() -> None:
    """models, models.runtime and the models CLI import without TensorFlow or dlib."""
    code = ("import sys, models, models.runtime.manifest, models.runtime.assets, models.cli; "
            "bad = [m for m in ('tensorflow', 'keras', 'dlib') if m in sys.modules]; print(bad); "
            "sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stdout + result.stderr
