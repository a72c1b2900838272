"""Bundle self-test: run a bundle's model on a synthetic chip and compare with the vector in the manifest.

The chip is generated from a seed with sha256 in counter mode (no image, no biometric data, and the
same bytes on every platform and numpy version). The server records the expected output when it builds
the bundle; a device accepts the bundle only if its own run agrees (cosine >= ``min_cosine``), which
catches a model that does not load, a wrong runtime, or a corrupted quantization.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from core.protocol.schemas import SelfTestSpec
from models.runtime.interpreter import ModelInputError, ModelLoadError, RuntimeUnavailableError, TFLiteModel

logger = logging.getLogger(__name__)

# The default agreement required between the server's and the device's run (int8 kernels differ a little
# between CPUs; a broken model lands far below this).
DEFAULT_MIN_COSINE = 0.99
DEFAULT_SEED = "facegate-selftest-v1"


class SelfTestError(Exception):
    """The bundle's model did not load or did not reproduce the expected vector."""


def synthetic_input(seed: str, shape: tuple[int, ...]) -> npt.NDArray[np.float32]:
    """Deterministic float32 values in [0, 1) of ``shape`` derived from ``seed``."""
    count = int(np.prod(shape)) if shape else 1
    blocks = []
    produced = 0
    counter = 0
    while produced < count:
        block = hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        blocks.append(block)
        produced += len(block)
        counter += 1
    raw = np.frombuffer(b"".join(blocks)[:count], dtype=np.uint8)
    return (raw.astype(np.float32) / 256.0).reshape(shape)


def model_output(model_path: Path, seed: str, threads: int = 1) -> npt.NDArray[np.float32]:
    """The model's first output on the synthetic input, flattened."""
    try:
        with TFLiteModel(model_path, threads=threads) as model:
            x = synthetic_input(seed, model.input.shape)
            return np.asarray(model.run(x), np.float32).ravel()
    except (ModelLoadError, ModelInputError, RuntimeUnavailableError, ValueError, OSError) as exc:
        raise SelfTestError(f"self-test model {model_path.name} failed to run: {exc}") from exc


def cosine(a: npt.NDArray[Any], b: npt.NDArray[Any]) -> float:
    """Cosine similarity (1.0 for two zero vectors, 0.0 when only one is zero)."""
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


def make_spec(bundle_root: Path, model_rel: str, seed: str = DEFAULT_SEED,
              min_cosine: float = DEFAULT_MIN_COSINE) -> SelfTestSpec:
    """Run the model once (server side) and record the expected vector."""
    expected = model_output(bundle_root / model_rel, seed)
    return SelfTestSpec(model=model_rel, seed=seed, expected=[float(v) for v in expected],
                        min_cosine=min_cosine)


def run_selftest(bundle_root: Path, spec: SelfTestSpec) -> float:
    """Run ``spec`` against the files under ``bundle_root``; return the cosine or raise SelfTestError."""
    actual = model_output(bundle_root / spec.model, spec.seed)
    expected = np.asarray(spec.expected, np.float32)
    if actual.shape != expected.shape:
        raise SelfTestError(f"self-test: {spec.model} produced {actual.size} values, manifest expects "
                            f"{expected.size}")
    if not np.all(np.isfinite(actual)):
        raise SelfTestError(f"self-test: {spec.model} produced NaN or inf")
    score = cosine(actual, expected)
    if score < spec.min_cosine:
        raise SelfTestError(f"self-test: {spec.model} output differs from the manifest (cosine {score:.4f} "
                            f"< {spec.min_cosine})")
    logger.debug("self-test of %s passed (cosine %.5f)", spec.model, score)
    return score


SelfTester = Callable[[Path, SelfTestSpec], float]
