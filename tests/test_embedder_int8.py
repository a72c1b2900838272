"""The int8 embedder agrees with the float32 one on real faces (CelebA chips cut by dlib)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.runtime.manifest import load_manifest, verify_entry
from tests.dlib_kit import DlibChips, celeba_dlib_chips, row_cosines

# Agreement the int8 model must keep with float32 (measured: mean ~0.9995, min ~0.998).
MIN_MEAN_COSINE = 0.999
MIN_COSINE = 0.995


@pytest.fixture(scope="module")
def reference(shared_dir: Path) -> DlibChips:
    """dlib chips and descriptors (cached between runs)."""
    pytest.importorskip("dlib", reason="dlib-bin cuts the reference chips")
    return celeba_dlib_chips(shared_dir)


def test_int8_io_is_quantized_and_recorded(built_models: Path) -> None:
    """The int8 entry takes uint8 pixels (scale 1, zero point 0) and returns a quantized int8 vector."""
    entry = load_manifest(built_models).get("embedder-int8")
    (inp,), (out,) = entry.inputs, entry.outputs
    assert (inp.shape, inp.dtype) == ([1, 150, 150, 3], "uint8")
    assert inp.quantization is not None
    assert (inp.quantization.scale, inp.quantization.zero_point) == (1.0, 0)
    assert (out.shape, out.dtype) == ([1, 128], "int8")
    assert out.quantization is not None and 0 < out.quantization.scale < 0.05


def test_int8_agrees_with_float(reference: DlibChips, built_models: Path) -> None:
    """Mean and minimum cosine between int8 and float32 embeddings over the CelebA chips."""
    from models.convert.export import embed_all

    manifest = load_manifest(built_models)
    chips = reference.chips.astype(np.float32)
    f32 = embed_all(verify_entry(built_models, manifest.get("embedder-float32")), chips)
    i8 = embed_all(verify_entry(built_models, manifest.get("embedder-int8")), chips)
    cos = row_cosines(i8, f32)
    vs_dlib = row_cosines(i8, reference.descriptors)
    print(f"int8 vs float32 on N={len(cos)} celeba chips: mean cos={cos.mean():.6f} min cos={cos.min():.6f}; "
          f"int8 vs dlib: mean {vs_dlib.mean():.6f} min {vs_dlib.min():.6f}")
    assert cos.mean() >= MIN_MEAN_COSINE
    assert cos.min() >= MIN_COSINE
