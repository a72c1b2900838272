"""Real headless Chromium for the web tests (selenium + chromedriver); skips with a reason when absent.

Screenshots go to artifacts/screenshots/ (git-ignored).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SCREENSHOTS = REPO / "artifacts" / "screenshots"
CHROMIUM = ("chromium", "chromium-browser", "google-chrome")  # looked up on PATH, as mosquitto is
WAIT_S = 60.0  # a safety net for slow CI machines, never a timing claim
CHROME_ARGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
    # A synthetic camera so the getUserMedia capture path runs without hardware.
    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
)


def chromium() -> str | None:
    """The Chromium binary on PATH, or None."""
    return next((found for name in CHROMIUM if (found := shutil.which(name))), None)


def open_chromium(profile: Path, width: int = 1280, height: int = 900) -> Any:
    """A headless Chromium driven by chromedriver (skips the test when either is missing)."""
    webdriver = pytest.importorskip("selenium.webdriver")
    binary, chromedriver = chromium(), shutil.which("chromedriver")
    if binary is None or chromedriver is None:
        pytest.skip("chromium and chromium-driver are not installed (apt install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    for arg in (*CHROME_ARGS, f"--window-size={width},{height}", f"--user-data-dir={profile}"):
        options.add_argument(arg)
    options.binary_location = binary
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return webdriver.Chrome(service=webdriver.ChromeService(chromedriver), options=options)


def shot(driver: Any, name: str) -> Path:
    """Save a screenshot of the page as artifacts/screenshots/<name>.png; return its path."""
    path = SCREENSHOTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path


def set_viewport(driver: Any, width: int, height: int) -> None:
    """Make the page's viewport (not the window) exactly ``width`` x ``height`` CSS pixels."""
    driver.set_window_size(width, height)
    inner = driver.execute_script("return [window.innerWidth, window.innerHeight]")
    driver.set_window_size(width + (width - inner[0]), height + (height - inner[1]))
