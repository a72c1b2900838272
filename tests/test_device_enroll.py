"""`facegate device enroll` (standalone): quality gates per image, JSON summary per image, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner
from skimage import data

from device.cli import cli as device_cli
from device.config import GalleryConfig
from device.gallery import Gallery
from device.vision.pipeline import FacePipeline
from tests.agent_support import no_face_frames, save_rgb, write_config


def test_enroll_gates_each_image_and_adds_accepted_ones(tmp_path: Path, built_models: Path) -> None:
    config = write_config(tmp_path / "device.toml", {"device": {"data_dir": str(tmp_path / "data")},
                                                      "models": {"dir": str(built_models)}})
    face = save_rgb(tmp_path / "astronaut.png", data.astronaut())
    empty = save_rgb(tmp_path / "coffee.png", no_face_frames(1)[0])
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not a photo")
    runner = CliRunner()
    result = runner.invoke(device_cli, ["enroll", "--config", str(config), "--person-id", "p-1", "--name",
                                        "Eileen", str(face), str(empty), str(broken)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["accepted"] for r in rows] == [True, False, False]
    assert rows[1]["failures"][0]["gate"] == "face_count" and rows[2]["error"]
    with FacePipeline.from_models_dir(built_models) as pipeline, \
            Gallery.open(tmp_path / "data" / "gallery", pipeline.model_sha256, GalleryConfig()) as gallery:
        assert gallery.persons() == {"p-1": "Eileen"} and gallery.template_count == 1

    none = runner.invoke(device_cli, ["enroll", "--config", str(config), "--person-id", "p-2", "--name",
                                      "Nobody", str(empty)])
    assert none.exit_code == 1 and not json.loads(none.stdout)["accepted"]
    bad_id = runner.invoke(device_cli, ["enroll", "--config", str(config), "--person-id", "a/b", "--name",
                                        "X", str(face)])
    assert bad_id.exit_code == 2 and "person id" in bad_id.output
