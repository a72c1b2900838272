"""The enrollment station in real headless Chromium (selenium + chromedriver) against a live uvicorn server,
real SQLite and real mosquitto. Screenshots of every page go to artifacts/screenshots/ (git-ignored)."""

from __future__ import annotations

import csv
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from device.config import QualityConfig
from device.vision.image import decode_image
from server.app import create_app
from tests.browser_kit import WAIT_S, open_chromium, shot
from tests.conftest import Broker, free_port
from tests.server_support import (
    ADMIN_PASSWORD,
    SimDevice,
    event_payload,
    no_face_image,
    png_bytes,
    status_payload,
)

pytestmark = pytest.mark.browser

pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


class LiveServer:
    """create_app served by uvicorn on a free port in a background thread."""

    def __init__(self, tmp: Path, broker: Broker) -> None:
        from tests.server_support import make_config

        self.port = free_port()
        config = make_config(tmp, mqtt={"enabled": True, "host": broker.host, "port": broker.port,
                                        "client_id": "web-test-server"})
        self.app = create_app(config)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + WAIT_S
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise AssertionError("uvicorn did not start")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    running = Broker(data_dir=tmp_path_factory.mktemp("web-broker"))
    running.start()
    try:
        yield running
    finally:
        running.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, broker: Broker) -> Iterator[LiveServer]:
    server = LiveServer(tmp_path_factory.mktemp("web"), broker)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    browser = open_chromium(tmp_path_factory.mktemp("chrome-profile"))
    try:
        yield browser
    finally:
        browser.quit()


def _wait(driver: WebDriver) -> WebDriverWait[WebDriver]:
    return WebDriverWait(driver, WAIT_S)


def _shot(driver: WebDriver, name: str) -> None:
    shot(driver, name)


def _login(driver: WebDriver, live: LiveServer, password: str = ADMIN_PASSWORD) -> None:
    driver.get(f"{live.url}/login")
    driver.find_element(By.ID, "username").send_keys("admin")
    driver.find_element(By.ID, "password").send_keys(password)
    driver.find_element(By.ID, "login-submit").click()


def _face_file(shared_dir: Path, built_models: Path, folder: Path) -> Path:
    """A CelebA photo that passes the enrollment gates, copied to ``folder``."""
    from device.config import DetectorConfig
    from device.vision.pipeline import FacePipeline
    from device.vision.quality import check_enrollment

    root = shared_dir / "data" / "celeba-faces"
    with open(root / "identities.csv", newline="", encoding="utf-8") as handle:
        paths = [root / row["path"] for row in csv.DictReader(handle)]
    with FacePipeline.from_models_dir(built_models, DetectorConfig()) as pipeline:
        for path in paths[:200]:
            if check_enrollment(decode_image(path.read_bytes()), pipeline, QualityConfig()).passed:
                target = folder / "grace.jpg"
                shutil.copyfile(path, target)
                return target
    raise AssertionError("no CelebA photo passed the enrollment gates")


def test_login(driver: WebDriver, live: LiveServer) -> None:
    driver.get(f"{live.url}/persons")
    _wait(driver).until(ec.url_contains("/login"))  # no session: the page sends us to log in
    _shot(driver, "01-login")
    _login(driver, live, password="wrong-password")
    error = _wait(driver).until(ec.visibility_of_element_located((By.ID, "login-error")))
    assert "invalid username or password" in error.text
    _shot(driver, "02-login-failed")
    _login(driver, live)
    _wait(driver).until(ec.url_contains("/persons"))
    assert driver.find_element(By.ID, "who").text == "admin (admin)"
    cookie = driver.get_cookie("facegate_session")
    assert cookie is not None and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    _shot(driver, "03-persons-empty")


def test_enroll_by_file_upload_and_see_the_person_listed(driver: WebDriver, live: LiveServer,
                                                          shared_dir: Path, built_models: Path) -> None:
    photo = _face_file(shared_dir, built_models, Path(tempfile.mkdtemp(prefix="facegate-web-")))
    driver.get(f"{live.url}/enroll")
    driver.find_element(By.ID, "name").send_keys("Grace Hopper")
    driver.find_element(By.ID, "consent").click()
    driver.find_element(By.ID, "files").send_keys(str(photo))
    driver.find_element(By.ID, "submit").click()
    status = _wait(driver).until(ec.text_to_be_present_in_element((By.ID, "enroll-status"), "Enrolled"))
    assert status
    result = driver.find_element(By.CSS_SELECTOR, "#results li.result")
    assert result.get_attribute("data-status") == "accepted"
    _shot(driver, "04-enroll-accepted")
    driver.get(f"{live.url}/persons")
    names = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#persons-table td.name")]
    assert names == ["Grace Hopper"]
    _shot(driver, "05-persons")
    driver.get(f"{live.url}/persons?q=nobody-matches")
    assert driver.find_elements(By.CSS_SELECTOR, "#persons-table td.name") == []


def test_image_without_a_face_shows_the_quality_gate_rejection(driver: WebDriver, live: LiveServer,
                                                               built_models: Path, tmp_path: Path) -> None:
    blank = tmp_path / "wall.png"
    blank.write_bytes(png_bytes(no_face_image()))
    driver.get(f"{live.url}/enroll")
    driver.find_element(By.ID, "name").send_keys("Nobody")
    driver.find_element(By.ID, "consent").click()
    driver.find_element(By.ID, "files").send_keys(str(blank))
    driver.find_element(By.ID, "submit").click()
    _wait(driver).until(ec.text_to_be_present_in_element((By.ID, "enroll-status"), "Not enrolled"))
    result = driver.find_element(By.CSS_SELECTOR, "#results li.result")
    assert result.get_attribute("data-status") == "rejected"
    gate = result.find_element(By.CSS_SELECTOR, ".gate")
    assert gate.get_attribute("data-gate") == "face_count" and "exactly one" in gate.text
    _shot(driver, "06-enroll-rejected")


def test_webcam_capture_is_checked_like_an_upload(driver: WebDriver, live: LiveServer,
                                                  built_models: Path) -> None:
    driver.get(f"{live.url}/enroll")
    driver.find_element(By.ID, "camera-start").click()
    _wait(driver).until(lambda d: d.find_element(By.ID, "capture").is_enabled())
    _wait(driver).until(lambda d: d.execute_script("return document.getElementById('camera').videoWidth") > 0)
    driver.find_element(By.ID, "capture").click()
    _wait(driver).until(ec.presence_of_element_located((By.CSS_SELECTOR, "#captures img.thumb")))
    driver.find_element(By.ID, "name").send_keys("Webcam Person")
    driver.find_element(By.ID, "consent").click()
    _shot(driver, "07-enroll-webcam")
    driver.find_element(By.ID, "submit").click()
    # Chromium's synthetic camera shows no face, so the capture is refused with the face-count gate.
    _wait(driver).until(ec.text_to_be_present_in_element((By.ID, "enroll-status"), "Not enrolled"))
    result = driver.find_element(By.CSS_SELECTOR, "#results li.result")
    assert result.text.startswith("capture-1.jpg")
    assert result.find_element(By.CSS_SELECTOR, ".gate").get_attribute("data-gate") == "face_count"


def test_event_from_a_simulated_device_appears_on_the_events_page(driver: WebDriver, live: LiveServer,
                                                                  broker: Broker) -> None:
    driver.get(f"{live.url}/events")
    _wait(driver).until(ec.presence_of_element_located((By.ID, "events-table")))
    door = SimDevice(broker.host, broker.port, "front-door")
    try:
        door.online()
        door.status(status_payload("front-door", bundle=4))
        event = event_payload("front-door", seq=1, name="Grace Hopper", person_id="p-grace")
        door.event(event)
        door.flush()
        row = _wait(driver).until(ec.presence_of_element_located(
            (By.CSS_SELECTOR, f"#events-table tr[data-event-id='{event.event_id}']")))
        assert "front-door" in row.text and "granted" in row.text and "Grace Hopper" in row.text
        _shot(driver, "08-events")
        driver.get(f"{live.url}/devices")
        device = driver.find_element(By.CSS_SELECTOR, "#devices-table tr[data-device-id='front-door']")
        assert "online" in device.text and "0.1.0" in device.text
        _shot(driver, "09-devices")
    finally:
        door.close()
    driver.get(f"{live.url}/audit")
    assert "login_failed" in driver.find_element(By.ID, "audit-table").text  # from test_login
    _shot(driver, "10-audit")
