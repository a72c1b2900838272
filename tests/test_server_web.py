"""The enrollment station in real headless Chromium (selenium + chromedriver) against a live uvicorn server,
real SQLite and real mosquitto. Screenshots of every page go to artifacts/screenshots/ (git-ignored)."""

from __future__ import annotations

import csv
import datetime as dt
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from core.types import DecisionKind
from device.config import QualityConfig
from device.decide.operating_point import operating_point
from models.face.image import decode_image
from server.app import create_app
from server.auth.service import Role, create_user
from tests.browser_kit import WAIT_S, open_chromium, shot
from tests.conftest import Broker, free_port
from tests.server_support import (
    ADMIN_PASSWORD,
    VIEWER_PASSWORD,
    SimDevice,
    event_payload,
    no_face_image,
    png_bytes,
    status_payload,
)

pytestmark = pytest.mark.browser
CONSISTENCY_TAU = operating_point(1).tau

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
                                        "client_id": "web-test-server"},
                             # Another person's photo added to someone scores ~0.85 with the int8 dlib
                             # embedder: flag anything under the door's calibrated level.
                             recognition={"consistency_tau": CONSISTENCY_TAU})
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


def _face_file(shared_dir: Path, built_models: Path, folder: Path, name: str = "grace.jpg",
               skip_identities: int = 0) -> Path:
    """A CelebA photo that passes the enrollment gates (of the first identity after ``skip_identities``
    identities with such a photo), copied to ``folder / name``."""
    from device.config import DetectorConfig
    from device.vision.pipeline import FacePipeline
    from device.vision.quality import check_enrollment

    root = shared_dir / "data" / "celeba-faces"
    with open(root / "identities.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    skipped: set[str] = set()
    with FacePipeline.from_models_dir(built_models, DetectorConfig()) as pipeline:
        for row in rows[:400]:
            if row["identity"] in skipped:
                continue
            path = root / row["path"]
            if check_enrollment(decode_image(path.read_bytes()), pipeline, QualityConfig()).passed:
                if len(skipped) < skip_identities:
                    skipped.add(row["identity"])
                    continue
                target = folder / name
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


def _api(live: LiveServer, username: str = "admin", password: str = ADMIN_PASSWORD) -> httpx.Client:
    client = httpx.Client(base_url=live.url, timeout=WAIT_S)
    response = client.post("/api/auth/login", json={"username": username, "password": password})
    assert response.status_code == 200, response.text
    client.headers["Authorization"] = f"Bearer {response.json()['access_token']}"
    return client


def _face_views(api: httpx.Client) -> int:
    return int(api.get("/api/audit", params={"action": "face_viewed", "limit": 1}).json()["total"])


def _image_loaded(driver: WebDriver, selector: str) -> bool:
    return bool(driver.execute_script(
        "const i = document.querySelector(arguments[0]); return !!i && i.complete && i.naturalWidth > 0",
        selector))


def test_faces_on_the_person_list_and_page_for_admins_only(driver: WebDriver, live: LiveServer,
                                                         shared_dir: Path, built_models: Path) -> None:
    api = _api(live)
    try:
        grace = next(p for p in api.get("/api/persons").json()["items"] if p["name"] == "Grace Hopper")
        # A photo of someone else added to Grace: enrolled, but flagged as far from her other face.
        other = _face_file(shared_dir, built_models, Path(tempfile.mkdtemp(prefix="facegate-web-")),
                           "other.jpg", skip_identities=1)
        added = api.post(f"/api/persons/{grace['id']}/images",
                         files={"images": ("other.jpg", other.read_bytes(), "image/jpeg")}).json()
        assert added["accepted"] == 1
        flagged = added["results"][0]["flagged"]
        assert flagged and added["results"][0]["consistency"] < CONSISTENCY_TAU
        views = _face_views(api)
        driver.get(f"{live.url}/persons")
        row = f"#persons-table tr[data-person-id='{grace['id']}']"
        _wait(driver).until(lambda d: _image_loaded(d, f"{row} img.face"))
        _shot(driver, "11-persons-faces")
        driver.find_element(By.CSS_SELECTOR, f"{row} td.name a").click()
        _wait(driver).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".face-card")) == 2)
        for card in driver.find_elements(By.CSS_SELECTOR, ".face-card"):
            chip_id = card.get_attribute("data-chip-id")
            _wait(driver).until(lambda d, c=chip_id: _image_loaded(d, f".face-card[data-chip-id='{c}'] img"))
        assert driver.find_element(By.ID, "person-name").text == "Grace Hopper"
        templates = api.get(f"/api/persons/{grace['id']}/templates").json()
        for template in templates:
            row_el = driver.find_element(By.CSS_SELECTOR, f"tr[data-template-id='{template['id']}']")
            sharp = row_el.find_element(By.CSS_SELECTOR, "td[data-figure='sharpness']").text
            assert float(sharp) == pytest.approx(template["quality"]["sharpness"], rel=1e-2)
            assert ("flagged" in row_el.text) == template["flagged"]
        assert any(t["flagged"] for t in templates) == flagged
        _shot(driver, "12-person-faces")
        # 1 thumbnail + 2 chips seen by the browser, each audited
        assert _face_views(api) == views + 3
        first_chip = templates[0]["chip_id"]
        image = api.get(f"/api/persons/{grace['id']}/chips/{first_chip}")
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        assert image.headers["cache-control"] == "no-store" and image.content[:8] == b"\x89PNG\r\n\x1a\n"
        assert _face_views(api) == views + 4
        assert api.get(f"/api/persons/{grace['id']}/chips/{'0' * 32}").status_code == 404
        driver.get(f"{live.url}/audit")
        assert "face_viewed" in driver.find_element(By.ID, "audit-table").text
    finally:
        api.close()
    state = live.app.state.facegate  # a viewer: no faces, by API or page
    with state.db.transaction() as session:
        create_user(session, "viewer-faces", VIEWER_PASSWORD, Role.VIEWER)
    viewer_api = _api(live, "viewer-faces", VIEWER_PASSWORD)
    try:
        assert viewer_api.get(f"/api/persons/{grace['id']}/thumbnail").status_code == 403
        token = viewer_api.headers["Authorization"].removeprefix("Bearer ")
        viewer_api.cookies.set("facegate_session", token)
        page = viewer_api.get(f"/persons/{grace['id']}")
        assert page.status_code == 403 and "Grace" not in page.text
    finally:
        viewer_api.close()


def test_events_page_charts_decisions_per_hour_per_door(driver: WebDriver, live: LiveServer,
                                                       broker: Broker) -> None:
    now = dt.datetime.now(dt.UTC)
    sent = {("front-door", "granted", 0): 3, ("front-door", "unknown", 2): 1, ("back-door", "spoof", 5): 2,
            ("back-door", "granted", 5): 1}
    doors = {name: SimDevice(broker.host, broker.port, name) for name in ("front-door", "back-door")}
    try:
        seq = 100
        for (name, kind, hours_ago), count in sent.items():
            for _ in range(count):
                seq += 1
                doors[name].event(event_payload(name, seq=seq, kind=DecisionKind(kind),
                                                ts=now - dt.timedelta(hours=hours_ago)))
        for door in doors.values():
            door.flush()
        api = _api(live)
        try:
            def counted() -> bool:
                body = api.get("/api/events/hourly").json()
                got = {d["device_id"]: d["counts"] for d in body["devices"]}
                return all(got.get(n, {}).get(k, [0] * 24)[23 - h] >= c for (n, k, h), c in sent.items())

            _wait(driver).until(lambda _: counted())
            hourly = api.get("/api/events/hourly").json()
        finally:
            api.close()
        driver.get(f"{live.url}/events")
        for door in hourly["devices"]:
            chart = f"svg.hourly[data-device-id='{door['device_id']}']"
            _wait(driver).until(lambda d, c=chart: d.find_elements(By.CSS_SELECTOR, c))
            for kind, counts in door["counts"].items():
                for hour, count in zip(hourly["hours"], counts, strict=True):
                    rects = driver.find_elements(
                        By.CSS_SELECTOR, f"{chart} g.bar[data-hour='{hour}'] rect[data-kind='{kind}']")
                    assert [int(r.get_attribute("data-count")) for r in rects] == ([count] if count else [])
        assert {"front-door", "back-door"} <= {d["device_id"] for d in hourly["devices"]}
        assert "spoof" in driver.find_element(By.ID, "chart-legend").text
        _shot(driver, "13-events-chart")
    finally:
        for door in doors.values():
            door.close()
