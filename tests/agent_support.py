"""Helpers for the agent tests: frame folders, configs written as TOML, polling without timed assertions."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from skimage import data

from device.waiting import WaitTimeout, wait_progress

# A hang guard while waiting for the loop, never asserted as a duration.
WAIT_S = 120.0
# `[liveness]` of loop tests that replay still photos (they cannot blink, and on a fresh clone there is no
# MiniFASNet): explicitly off, as a user would have to write it. Liveness is tested with its engine
# (test_liveness_agent.py, test_fail_secure.py).
LIVENESS_OFF: dict[str, Any] = {"required": False, "passive": {"enabled": False},
                                     "challenge": {"mode": "never"}}


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT_S,
               progress: Callable[[], Hashable] | None = None) -> bool:
    """Poll ``predicate`` until true; False once ``progress()`` stood still for ``timeout``."""
    try:
        wait_progress(predicate, "an agent condition", stall_s=timeout, progress=progress)
    except WaitTimeout:
        return predicate()
    return True


def save_rgb(path: Path, rgb: np.ndarray) -> Path:
    """Write an RGB array as PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR))
    return path


def write_frames(folder: Path, frames: Sequence[np.ndarray]) -> Path:
    """A replay folder: frames named in order."""
    for i, rgb in enumerate(frames):
        save_rgb(folder / f"{i:04d}.png", rgb)
    return folder


def no_face_frames(count: int, size: int = 320) -> list[np.ndarray]:
    """Frames without a face (coffee cup and rocket photos, resized)."""
    sources = [data.coffee(), data.rocket()]
    return [cv2.resize(sources[i % len(sources)], (size, size)) for i in range(count)]


def astronaut_frames(count: int, seed: int = 0) -> list[np.ndarray]:
    """Augmented astronaut frames: small shifts, zoom and brightness changes, as a camera would see."""
    base = data.astronaut()
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        x0, y0 = (int(v) for v in rng.integers(0, 24, 2))
        side = int(rng.integers(460, 488))
        crop = cv2.resize(base[y0:y0 + side, x0:x0 + side], (400, 400))
        gain = float(rng.uniform(0.85, 1.15))
        out.append(np.clip(crop.astype(np.float32) * gain, 0, 255).astype(np.uint8))
    return out


def _toml_value(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _toml_table(name: str, values: dict[str, Any]) -> list[str]:
    """``[name]`` with its keys, then a ``[name.sub]`` table for each nested dict."""
    lines = [f"[{name}]"]
    lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items()
                 if not isinstance(value, dict))
    lines.append("")
    for key, value in values.items():
        if isinstance(value, dict):
            lines.extend(_toml_table(f"{name}.{key}", value))
    return lines


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    """A device config TOML from plain dicts (what a user would write; nested dicts are sub-tables)."""
    lines = []
    for name, values in sections.items():
        lines.extend(_toml_table(name, values))
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def stranger_frames(count: int, seed: int = 1) -> list[np.ndarray]:
    """A face that is not the astronaut: scikit-image's first LFW face (25x25, upscaled), slightly shifted."""
    small = (data.lfw_subset()[0] * 255).astype(np.uint8)
    face = cv2.resize(small, (200, 200), interpolation=cv2.INTER_CUBIC)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        frame = np.full((320, 320, 3), 128, np.uint8)
        x0, y0 = (int(v) for v in rng.integers(50, 70, 2))
        frame[y0:y0 + 200, x0:x0 + 200] = face[:, :, None]
        out.append(frame)
    return out
