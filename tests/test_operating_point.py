"""The calibrated operating point: measured rows by gallery size, and the examples that quote it."""

from __future__ import annotations

import tomllib
from pathlib import Path

from device.decide.operating_point import CALIBRATED, DEFAULT_DELTA, DEFAULT_TAU, operating_point, tau_floor

REPO = Path(__file__).resolve().parents[1]


def test_rows_are_measured_and_sorted_and_the_default_is_the_largest_gallery() -> None:
    sizes = [row.max_gallery_size for row in CALIBRATED]
    assert sizes == sorted(sizes) and sizes == [10, 100, 1_000, 10_000]
    for row in CALIBRATED:
        assert 0.0 < row.tau < 1.0 and 0.0 <= row.delta <= 0.1
        assert row.fpir is not None and row.fnir is not None  # held-out figures recorded with the row
    assert (DEFAULT_TAU, DEFAULT_DELTA) == (CALIBRATED[-1].tau, CALIBRATED[-1].delta)
    assert operating_point(1) is CALIBRATED[0] and operating_point(50) is CALIBRATED[1]
    assert operating_point(10**6) is CALIBRATED[-1] and tau_floor(10**6) == DEFAULT_TAU


def test_example_configs_quote_the_default() -> None:
    device = tomllib.loads((REPO / "deploy" / "device.example.toml").read_text())["decision"]
    assert (device["tau"], device["delta"]) == (DEFAULT_TAU, DEFAULT_DELTA)
    server = tomllib.loads((REPO / "deploy" / "server.example.toml").read_text())["recognition"]
    assert server["tau"] == DEFAULT_TAU
