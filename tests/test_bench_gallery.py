"""`facegate bench gallery` at small sizes: one JSON object, exact recall for flat, sane IVF figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import bench.gallery_data
from bench.gallery import gallery


def test_bench_gallery_json_small(tmp_path: Path, built_models: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench.gallery_data, "CACHE_DIR", tmp_path / "cache")
    args = ["--sizes", "2000", "--queries", "50", "--models-dir", str(built_models), "--shared",
            str(tmp_path / "no-shared"), "--json"]
    flat = CliRunner().invoke(gallery, args)
    assert flat.exit_code == 0, flat.output
    out = json.loads(flat.stdout, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert out["threads"] == 1 and out["source"].startswith("skimage-astronaut")
    row = out["results"][0]
    assert row["index"]["kind"] == "flat" and row["recall_at_1"] == 1.0 and row["p50_ms"] > 0
    assert list((tmp_path / "cache").glob("real-*.npz"))  # real embeddings cached for the next run
    ivf = CliRunner().invoke(gallery, [*args, "--index", "ivf"])
    assert ivf.exit_code == 0, ivf.output
    row = json.loads(ivf.stdout)["results"][0]
    assert row["index"]["kind"] == "ivf" and row["index"]["nlist"] >= 1 and 0.9 <= row["recall_at_1"] <= 1.0
    assert 0.0 <= row["fpir"] <= 1.0 and 0.0 <= row["fnir"] <= 1.0 and row["nonmated"] == 50
    assert -1.0 <= row["tau"] <= 1.0 and row["delta"] >= 0.0
