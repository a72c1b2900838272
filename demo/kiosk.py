"""The demo's door screen: watch the kiosk the door serves, as a person at the door would, and keep a
screenshot (headless Chromium, 800x480: the Pi's 7" display) of every state the page shows.

The page's own ``data-state`` is what counts as seen: a state that flashed by between two of the page's
polls was on no screen. Chromium is driven through selenium (the ``dev`` extra, with ``chromium`` and
``chromedriver`` on PATH); without them the states come from ``GET /kiosk/state`` and the summary says
why there are no screenshots.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SCREEN_W, SCREEN_H = 800, 480
# How often the watcher looks at the page (the page itself polls the door every 250 ms).
LOOK_S = 0.1
CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
CHROME_ARGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--no-first-run")
PAGE_LOAD_TIMEOUT_S = 60


@dataclass(slots=True)
class KioskReport:
    """What the summary's ``kiosk`` block says."""

    url: str
    states_seen: list[str] = field(default_factory=list)
    screenshots: list[str] = field(default_factory=list)
    screenshots_skipped: str = ""

    def as_dict(self) -> dict[str, Any]:
        """The JSON block: url, states in the order first seen, one screenshot per state."""
        out: dict[str, Any] = {"url": self.url, "states_seen": list(self.states_seen),
                               "screenshots": list(self.screenshots)}
        if self.screenshots_skipped:
            out["screenshots_skipped"] = self.screenshots_skipped
        return out


def open_browser(profile: Path) -> Any:
    """Headless Chromium at 800x480 through selenium; raises RuntimeError saying what is missing."""
    try:
        from selenium import webdriver
    except ImportError as exc:
        raise RuntimeError("selenium is not installed (pip install 'facegate[dev]')") from exc
    binary = next((found for name in CHROMIUM if (found := shutil.which(name))), None)
    driver_path = shutil.which("chromedriver")
    if binary is None or driver_path is None:
        raise RuntimeError("chromium and chromedriver are not on PATH (apt install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    for arg in (*CHROME_ARGS, f"--user-data-dir={profile}"):
        options.add_argument(arg)
    options.binary_location = binary
    browser = webdriver.Chrome(service=webdriver.ChromeService(driver_path), options=options)
    browser.set_page_load_timeout(PAGE_LOAD_TIMEOUT_S)
    browser.set_window_size(SCREEN_W, SCREEN_H)
    inner = browser.execute_script("return [window.innerWidth, window.innerHeight]")
    browser.set_window_size(2 * SCREEN_W - inner[0], 2 * SCREEN_H - inner[1])  # the viewport is 800x480
    return browser


class KioskWatcher:
    """Looks at the kiosk page in its own thread until ``close()``; ``report`` holds what it saw."""

    def __init__(self, url: str, screenshots: Path) -> None:
        self.report = KioskReport(url)
        self.folder = screenshots
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="demo-kiosk", daemon=True)
        self._profile = Path(tempfile.mkdtemp(prefix="facegate-demo-chrome-"))

    def start(self) -> KioskWatcher:
        """Start watching."""
        self._thread.start()
        return self

    def _seen(self, state: str) -> bool:
        """Record a state; True when it is new."""
        with self._lock:
            if not state or state in self.report.states_seen:
                return False
            self.report.states_seen.append(state)
            return True

    def _run(self) -> None:
        try:
            browser = open_browser(self._profile)
        except Exception as exc:  # no browser here: follow the state JSON instead, and say why
            self.report.screenshots_skipped = f"no screenshots: {exc}"
            logger.warning("kiosk screenshots skipped: %s", exc)
            self._follow_json()
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            for old in self.folder.glob("kiosk-*.png"):
                old.unlink()
            browser.get(self.report.url)
            while not self._stop.wait(LOOK_S):
                state = str(browser.execute_script("return document.body.dataset.state || ''"))
                if self._seen(state):
                    path = self.folder / f"kiosk-{len(self.report.states_seen):02d}-{state}.png"
                    browser.save_screenshot(str(path))
                    with self._lock:
                        self.report.screenshots.append(str(path))
        except Exception as exc:  # the demo goes on without its screen; the summary says what happened
            logger.exception("kiosk watcher failed")
            self.report.screenshots_skipped = f"the browser failed: {type(exc).__name__}: {exc}"
        finally:
            browser.quit()

    def _follow_json(self) -> None:
        while not self._stop.wait(LOOK_S):
            try:
                with urllib.request.urlopen(f"{self.report.url}/state", timeout=5) as response:  # noqa: S310
                    self._seen(str(json.load(response).get("state", "")))
            except (OSError, ValueError) as exc:
                logger.debug("kiosk state unavailable: %s", exc)

    def close(self) -> KioskReport:
        """Stop watching and return what was seen (idempotent)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(PAGE_LOAD_TIMEOUT_S)
        shutil.rmtree(self._profile, ignore_errors=True)
        return self.report
