"""Camera sources: replay (folder and video), OpenCV reconnect, picamera2 through a fake module."""

from __future__ import annotations

import shutil
import sys
import types
from pathlib import Path
from typing import Any, ClassVar

import cv2
import numpy as np
import pytest

from device.camera import (
    SOURCES,
    Backoff,
    CameraSetupError,
    CameraUnavailable,
    OpenCVSource,
    PiCamera2Source,
    ReplaySource,
    create_source,
)
from device.config import DeviceConfig, OpenCVCameraConfig


def write_images(folder: Path, count: int, size: tuple[int, int] = (64, 48)) -> list[np.ndarray]:
    """Distinct solid RGB images saved as PNG (lossless); returns them in RGB."""
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for i in range(count):
        rgb = np.zeros((size[1], size[0], 3), np.uint8)
        rgb[..., 0] = 10 * i  # red channel encodes the index
        rgb[..., 2] = 200
        cv2.imwrite(str(folder / f"{i:03d}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        images.append(rgb)
    return images


def write_video(path: Path, count: int, size: tuple[int, int] = (64, 48)) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, size)
    assert writer.isOpened()
    for i in range(count):
        bgr = np.zeros((size[1], size[0], 3), np.uint8)
        bgr[..., 0] = 220  # blue in OpenCV's BGR
        bgr[..., 2] = 20 + 5 * i
        writer.write(bgr)
    writer.release()


def test_registry_by_type_from_config(tmp_path: Path) -> None:
    assert set(SOURCES) == {"replay", "opencv", "picamera2"}
    cfg = DeviceConfig.model_validate({"camera": {"type": "replay", "path": str(tmp_path), "fps": 4}})
    source = create_source(cfg.camera)
    assert isinstance(source, ReplaySource) and source.frame_interval_s == pytest.approx(0.25)
    opencv = create_source(OpenCVCameraConfig(source="rtsp://user:secret@cam/stream", reconnect_initial_s=1,
                                              reconnect_max_s=4))
    assert isinstance(opencv, OpenCVSource) and "secret" not in opencv.source_id
    assert [opencv.backoff.next_delay() for _ in range(4)] == [1, 2, 4, 4]


def test_replay_folder_sorted_rgb_bad_files_skipped_once(tmp_path: Path) -> None:
    images = write_images(tmp_path / "frames", 3)
    (tmp_path / "frames" / "001b.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (tmp_path / "frames" / "notes.txt").write_text("ignored")
    with ReplaySource(tmp_path / "frames", fps=100) as source:
        frames = []
        while (frame := source.read()) is not None:
            frames.append(frame)
        assert source.read() is None
    assert len(frames) == 3 and source.bad_frames == 1
    for frame, rgb in zip(frames, images, strict=True):
        assert frame.rgb.dtype == np.uint8 and np.array_equal(frame.rgb, rgb)
    assert [f.index for f in frames] == [1, 2, 3]
    source.close()


def test_replay_loops_and_raises_when_the_folder_disappears_then_recovers(tmp_path: Path) -> None:
    folder = tmp_path / "frames"
    write_images(folder, 2)
    source = ReplaySource(folder, loop=True)
    source.open()
    reds = [int(source.read().rgb[0, 0, 0]) for _ in range(5)]  # type: ignore[union-attr]
    assert reds == [0, 10, 0, 10, 0]
    shutil.move(folder, tmp_path / "away")
    with pytest.raises(CameraUnavailable):
        source.read()
    with pytest.raises(CameraUnavailable, match="does not exist"):
        source.open()
    shutil.move(tmp_path / "away", folder)
    source.open()
    assert source.read() is not None
    source.close()


def test_replay_video_once_and_looped(tmp_path: Path) -> None:
    video = tmp_path / "clip.avi"
    write_video(video, 4)
    with ReplaySource(video) as once:
        frames = [once.read() for _ in range(5)]
    assert [f is not None for f in frames] == [True, True, True, True, False]
    first = frames[0]
    assert first is not None and first.rgb[0, 0, 2] > 200 and first.rgb[0, 0, 0] < 60  # BGR -> RGB
    with ReplaySource(video, loop=True) as looped:
        assert all(looped.read() is not None for _ in range(10))


def test_opencv_reconnects_with_backoff_when_a_video_file_disappears_and_returns(tmp_path: Path) -> None:
    video = tmp_path / "cam.avi"
    write_video(video, 3)
    source = OpenCVSource(str(video), backoff=Backoff(0.01, 0.04))
    source.open()
    got = [source.read() for _ in range(3)]
    assert all(f is not None and f.rgb.shape == (48, 64, 3) for f in got)
    with pytest.raises(CameraUnavailable, match="dropped"):
        source.read()  # end of the "stream"
    video.rename(tmp_path / "gone.avi")
    delays = []
    for _ in range(3):
        with pytest.raises(CameraUnavailable, match="cannot open"):
            source.open()
        delays.append(source.backoff.next_delay())
    assert delays == [0.01, 0.02, 0.04]
    (tmp_path / "gone.avi").rename(video)
    source.open()
    assert source.read() is not None
    source.backoff.reset()
    assert source.backoff.next_delay() == 0.01
    source.close()
    source.close()


class FakePicamera2:
    """picamera2.Picamera2 in the real API's shape; frames are BGR in memory like libcamera's RGB888."""

    instances: ClassVar[list[FakePicamera2]] = []
    fail_after: ClassVar[int | None] = None

    def __init__(self, camera_num: int = 0) -> None:
        self.config: dict[str, Any] | None = None
        self.started = False
        self.closed = False
        self.captured = 0
        FakePicamera2.instances.append(self)

    def create_preview_configuration(self, main: dict[str, Any] | None = None,
                                     **kwargs: Any) -> dict[str, Any]:
        main = dict(main or {})
        main.setdefault("format", "XBGR8888")
        main.setdefault("size", (640, 480))
        return {"use_case": "preview", "main": main, **kwargs}

    def configure(self, camera_config: dict[str, Any]) -> None:
        self.config = camera_config

    def start(self, config: dict[str, Any] | None = None, show_preview: bool = False) -> None:
        assert self.config is not None, "configure() must come before start()"
        self.started = True

    def capture_array(self, name: str = "main") -> np.ndarray:
        assert self.started and self.config is not None
        if FakePicamera2.fail_after is not None and self.captured >= FakePicamera2.fail_after:
            raise RuntimeError("Camera frontend has timed out!")
        self.captured += 1
        width, height = self.config["main"]["size"]
        if self.captured == 2:
            return np.zeros((0, 0, 3), np.uint8)  # an empty buffer: a bad frame
        bgr = np.zeros((height, width, 3), np.uint8)
        bgr[..., 0] = 200  # blue
        bgr[..., 2] = 30  # red
        return bgr

    def stop(self) -> None:
        self.started = False

    def close(self) -> None:
        self.closed = True


@pytest.fixture()
def fake_picamera2(monkeypatch: pytest.MonkeyPatch) -> type[FakePicamera2]:
    module = types.ModuleType("picamera2")
    module.Picamera2 = FakePicamera2  # type: ignore[attr-defined]
    FakePicamera2.instances = []
    FakePicamera2.fail_after = None
    monkeypatch.setitem(sys.modules, "picamera2", module)
    return FakePicamera2


def test_picamera2_configures_rgb888_and_returns_rgb(fake_picamera2: type[FakePicamera2]) -> None:
    with PiCamera2Source(320, 240) as source:
        cam = fake_picamera2.instances[0]
        assert cam.config is not None and cam.config["main"] == {"size": (320, 240), "format": "RGB888"}
        first = source.read()
        second = source.read()  # the empty buffer was skipped
    assert first is not None and second is not None and source.bad_frames == 1
    assert first.rgb.shape == (240, 320, 3)
    assert tuple(first.rgb[0, 0]) == (30, 0, 200)  # BGR in memory -> RGB
    assert cam.closed


def test_picamera2_capture_failure_is_unavailable_and_reopens(fake_picamera2: type[FakePicamera2]) -> None:
    fake_picamera2.fail_after = 1
    source = PiCamera2Source()
    source.open()
    assert source.read() is not None
    with pytest.raises(CameraUnavailable, match="timed out"):
        source.read()
    assert fake_picamera2.instances[0].closed
    fake_picamera2.fail_after = None
    source.open()
    assert len(fake_picamera2.instances) == 2 and source.read() is not None
    source.close()
    source.close()


def test_picamera2_missing_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "picamera2", None)
    with pytest.raises(CameraSetupError, match="python3-picamera2"):
        PiCamera2Source().open()
