"""``facegate models build``: the manifest contract, skipping finished work, cards and MiniFASNet."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from models.convert.builder import STAMP_NAME, build_all
from models.runtime.manifest import MANIFEST_NAME, load_manifest, verify_entry
from tests.conftest import shared_minifasnet

CORE_ENTRIES = {
    "embedder-float32": "embedder", "embedder-int8": "embedder", "blazeface-short": "detector",
    "blazeface-full": "detector", "facemesh": "landmarks",
}


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.is_file() and p.suffix != ".lock"}


def test_manifest_lists_every_model(built_models: Path) -> None:
    """Each entry names its role, file, sha256, shapes, dtypes, source package/version and license."""
    manifest = load_manifest(built_models)
    roles = {entry.name: entry.role for entry in manifest.models}
    assert {name: roles.get(name) for name in CORE_ENTRIES} == CORE_ENTRIES
    for entry in manifest.models:
        verify_entry(built_models, entry)
        assert entry.size == (built_models / entry.file).stat().st_size
        assert entry.inputs and entry.outputs and entry.source_package and entry.license
        assert entry.source_version not in ("", "unknown")
        assert entry.metrics["latency_ms_1thread"] > 0
    f32 = manifest.get("embedder-float32")
    assert (f32.inputs[0].shape, f32.inputs[0].dtype, f32.outputs[0].shape) == ([1, 150, 150, 3], "float32",
                                                                                 [1, 128])
    assert manifest.get("embedder-int8").metrics["holdout_int8_vs_float_cosine_min"] > 0.99
    card = (built_models / "cards" / "embedder.md").read_text(encoding="utf-8")
    assert "embedder-int8" in card and f32.sha256[:16] in card


def test_second_build_skips_finished_work(built_models: Path) -> None:
    """Building again with the same inputs rewrites nothing: files, manifest and stamp keep their mtimes."""
    before = _mtimes(built_models)
    manifest_before = (built_models / MANIFEST_NAME).read_text(encoding="utf-8")
    path = build_all(built_models, minifasnet_dir=shared_minifasnet(), progress=False)
    assert path == built_models / MANIFEST_NAME
    assert (built_models / MANIFEST_NAME).read_text(encoding="utf-8") == manifest_before
    assert _mtimes(built_models) == before


def test_changed_or_damaged_file_is_rebuilt(built_models: Path, tmp_path: Path) -> None:
    """A damaged artifact is rebuilt while the intact ones are reused."""
    out = tmp_path / "models"
    shutil.copytree(built_models, out)
    (out / "blazeface-short.tflite").write_bytes(b"damaged")
    embedder_mtime = (out / "embedder-int8.tflite").stat().st_mtime_ns
    build_all(out, progress=False)
    manifest = load_manifest(out)
    verify_entry(out, manifest.get("blazeface-short"))
    assert (out / "embedder-int8.tflite").stat().st_mtime_ns == embedder_mtime
    stamp = json.loads((out / STAMP_NAME).read_text(encoding="utf-8"))
    assert stamp["built"] == ["blazeface-short"]


def test_minifasnet_entries_when_given(built_models: Path, shared_dir: Path, tmp_path: Path) -> None:
    """--minifasnet adds the two liveness models; the embedder is reused, not reconverted."""
    out = tmp_path / "models"
    shutil.copytree(built_models, out)
    for old in out.glob("minifasnet-*.tflite"):  # another run may have added them to the shared folder
        old.unlink()
    path = subprocess.run(
        [str(Path(sys.executable).parent / "facegate"), "models", "build", "--out", str(out), "--no-progress",
         "--minifasnet", str(shared_dir / "models" / "minifasnet")],
        capture_output=True, text=True, timeout=600, check=True).stdout.strip().splitlines()[-1]
    assert Path(path) == out / MANIFEST_NAME
    manifest = load_manifest(out)
    for name in ("minifasnet-2.7", "minifasnet-4.0"):
        entry = manifest.get(name)
        assert entry.role == "liveness" and entry.license == "Apache-2.0"
        assert entry.inputs[0].shape == [1, 80, 80, 3] and entry.outputs[0].shape == [1, 3]
    stamp = json.loads((out / STAMP_NAME).read_text(encoding="utf-8"))
    assert sorted(stamp["built"]) == ["minifasnet-2.7", "minifasnet-4.0"]
    assert (out / "cards" / "minifasnet.md").is_file()
    # A later plain build keeps them (intact files) and rebuilds nothing.
    before = (out / MANIFEST_NAME).read_text(encoding="utf-8")
    build_all(out, progress=False)
    assert (out / MANIFEST_NAME).read_text(encoding="utf-8") == before
    (out / "minifasnet-4.0.tflite").unlink()
    build_all(out, progress=False)
    names = [entry.name for entry in load_manifest(out).models]
    assert "minifasnet-2.7" in names and "minifasnet-4.0" not in names


def test_missing_calibration_folder_is_a_clear_error(tmp_path: Path) -> None:
    """A calibration folder that does not exist fails before any work, naming the folder."""
    from models.convert.artifacts import BuildError

    with pytest.raises(BuildError, match="calibration folder"):
        build_all(tmp_path / "out", calibration_dir=tmp_path / "nope", progress=False)


def test_site_calibration_rebuilds_only_int8(built_models: Path, tmp_path: Path) -> None:
    """--calibration (server re-calibration) re-quantizes the int8 embedder and reuses everything else."""
    import cv2

    from models.convert.calibration import calibration_set

    site = tmp_path / "site-chips"
    site.mkdir()
    for index, chip in enumerate(calibration_set(12, seed=3)):
        cv2.imwrite(str(site / f"chip{index:02d}.png"), cv2.cvtColor(chip.astype("uint8"), cv2.COLOR_RGB2BGR))
    out = tmp_path / "models"
    shutil.copytree(built_models, out)
    build_all(out, calibration_dir=site, progress=False)
    stamp = json.loads((out / STAMP_NAME).read_text(encoding="utf-8"))
    assert stamp["built"] == ["embedder-int8"]
    entry = load_manifest(out).get("embedder-int8")
    assert "site chips" in entry.extra["calibration"]
    assert entry.metrics["holdout_int8_vs_float_cosine_min"] > 0.99
    assert entry.inputs[0].quantization is not None and entry.inputs[0].quantization.scale == 1.0
