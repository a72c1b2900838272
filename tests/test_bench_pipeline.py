"""`facegate bench pipeline`: structure of the figures (no timing assertions)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from bench.cli import cli
from bench.pipeline import STAGES, measure, packaged_images, run_bench


def test_packaged_images_are_250px_faces() -> None:
    images = packaged_images()
    assert len(images) >= 10
    assert all(img.shape == (250, 250, 3) and img.dtype == np.uint8 for img in images)


def test_run_bench_reports_every_stage_and_the_ratio(built_models: Path) -> None:
    result = run_bench(built_models, None, runs=3, pipelines=("int8", "dlib"))
    assert result["threads"] == 1 and result["runs"] == 3
    for name in ("int8", "dlib"):
        row = result["pipelines"][name]
        assert set(STAGES) <= set(row) and row["runs"] + row["misses"] == 3
        assert all(row[s] > 0 for s in STAGES)
    assert result["ratio_dlib_over_ours"]["int8"] > 0


def test_no_face_anywhere_is_an_error() -> None:
    with pytest.raises(ValueError, match="no face"):
        measure(lambda rgb: {"detect": 1.0}, [np.zeros((8, 8, 3), np.uint8)], runs=2, warmup=0)


def test_cli_requires_at_least_100_runs() -> None:
    result = CliRunner().invoke(cli, ["pipeline", "--runs", "5"])
    assert result.exit_code != 0 and "100" in result.output
