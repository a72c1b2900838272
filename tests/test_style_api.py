"""The /style job API through FastAPI's TestClient: lifecycle, cancel, auth hook, bad inputs.

The backbone is SqueezeNet with random weights (no ../shared needed): the service's behaviour, not the
art, is under test here.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("fastapi")

from fastapi import FastAPI, Header, HTTPException
from fastapi.testclient import TestClient
from PIL import Image

from server.style.api import build_router
from server.style.config import StyleConfig
from server.style.images import encode_png
from server.style.jobs import JobState, StyleJobError, StyleJobs

# A deadline only so that a broken worker fails the test instead of hanging it (not a timing claim).
POLL_DEADLINE_S = 300.0
RNG = np.random.default_rng(7)
SMALL = json.dumps({"size": 64, "iters": 2})


def _png(height: int = 64, width: int = 64, flat: bool = False) -> bytes:
    if flat:  # compresses to a few hundred bytes whatever its size: tests the pixel limit alone
        return encode_png(np.full((height, width, 3), 90, np.uint8))
    return encode_png(RNG.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def _files(content: bytes | None = None, style: bytes | None = None) -> dict[str, Any]:
    return {"content": ("c.png", content if content is not None else _png(), "image/png"),
            "style": ("s.png", style if style is not None else _png(), "image/png")}


def _client(jobs: StyleJobs, require_role: Any = None) -> TestClient:
    app = FastAPI()
    app.include_router(build_router(jobs, require_role))
    return TestClient(app)


def _wait(client: TestClient, job_id: str, states: set[str]) -> dict[str, Any]:
    deadline = time.monotonic() + POLL_DEADLINE_S
    while time.monotonic() < deadline:
        body: dict[str, Any] = client.get(f"/style/jobs/{job_id}").json()
        if body["state"] in states:
            return body
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached {states}")


@pytest.fixture()
def jobs() -> Iterator[StyleJobs]:
    config = StyleConfig(backbone="squeezenet", random_weights=True, workers=1, max_pending=3,
                         max_upload_bytes=200_000, max_pixels=300 * 300, max_size=128, max_iters=5000)
    with StyleJobs(config) as service:
        yield service


def test_job_lifecycle_done_with_losses_and_result(jobs: StyleJobs) -> None:
    client = _client(jobs)
    params = {"size": 48, "iters": 4, "strip_every": 2, "optimizer": "adam"}
    created = client.post("/style/jobs", files=_files(_png(60, 80)), data={"params": json.dumps(params)})
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    assert created.json()["result_url"] == f"/style/jobs/{job_id}/result.png"
    done = _wait(client, job_id, {"done", "failed"})
    assert done["state"] == "done", done
    assert done["iteration"] == 4 and done["iterations"] == 4
    assert set(done["losses"]) == {"total", "content", "style", "tv"}
    assert (done["width"], done["height"]) == (48, 36) and done["has_strip"] is True
    result = client.get(f"/style/jobs/{job_id}/result.png")
    assert result.status_code == 200 and result.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(result.content)).size == (48, 36)
    strip = client.get(f"/style/jobs/{job_id}/strip.png")
    assert Image.open(io.BytesIO(strip.content)).size == (96, 36)
    # Cancelling a finished job leaves it done.
    assert client.delete(f"/style/jobs/{job_id}").json()["state"] == "done"


def test_cancel_running_and_queued_jobs(jobs: StyleJobs) -> None:
    client = _client(jobs)
    long = {"size": 64, "iters": 5000, "optimizer": "adam"}
    running_id = client.post("/style/jobs", files=_files(), data={"params": json.dumps(long)}).json()["id"]
    running = _wait(client, running_id, {"running"})
    queued_id = client.post("/style/jobs", files=_files(), data={"params": json.dumps(long)}).json()["id"]
    assert client.get(f"/style/jobs/{queued_id}").json()["state"] == "queued"  # one worker, busy
    assert running["iterations"] == 5000

    cancelled_queued = client.delete(f"/style/jobs/{queued_id}")
    assert cancelled_queued.status_code == 202 and cancelled_queued.json()["state"] == "cancelled"

    progressed = running
    while progressed["iteration"] < 2:  # let it report progress, then check the ETA
        progressed = _wait(client, running_id, {"running", "done", "failed"})
    assert progressed["eta_s"] is not None and progressed["eta_s"] > 0
    client.delete(f"/style/jobs/{running_id}")
    final = _wait(client, running_id, {"cancelled", "done", "failed"})
    assert final["state"] == "cancelled" and final["iteration"] < 5000
    not_ready = client.get(f"/style/jobs/{running_id}/result.png")
    assert not_ready.status_code == 409 and not_ready.json()["detail"]["state"] == "cancelled"


def test_queue_limit_gives_503(jobs: StyleJobs) -> None:
    client = _client(jobs)
    long = json.dumps({"size": 48, "iters": 5000, "optimizer": "adam"})
    ids = [client.post("/style/jobs", files=_files(), data={"params": long}).json()["id"] for _ in range(3)]
    busy = client.post("/style/jobs", files=_files(), data={"params": long})
    assert busy.status_code == 503 and busy.headers["retry-after"]
    for job_id in ids:
        client.delete(f"/style/jobs/{job_id}")


@pytest.mark.parametrize(("files", "params", "status", "needle"), [
    (_files(content=b"definitely not an image"), None, 415, "not a readable image"),
    (_files(style=b""), None, 415, "empty"),
    (_files(content=b"\x89PNG" + b"0" * 250_000), None, 413, "bytes"),
    (_files(content=_png(320, 320, flat=True)), None, 413, "pixels"),
    (_files(content=_png(8, 64)), None, 400, "px a side"),
    (_files(), "{not json", 422, ""),
    (_files(), json.dumps({"bogus": 1}), 422, "extra"),
    (_files(), json.dumps({"size": 256}), 422, "exceeds the limit"),
    (_files(), json.dumps({"iters": 6000}), 422, "less than or equal"),
    (_files(), json.dumps({"size": 64, "style_layers": ["block1_conv1"]}), 422, "no layer"),
])
def test_bad_inputs_get_clear_4xx(jobs: StyleJobs, files: dict[str, Any], params: str | None, status: int,
                                  needle: str) -> None:
    client = _client(jobs)
    response = client.post("/style/jobs", files=files, data={"params": params or SMALL})
    assert response.status_code == status, response.text
    assert needle in response.text


def test_missing_file_and_unknown_job(jobs: StyleJobs) -> None:
    client = _client(jobs)
    assert client.post("/style/jobs", files={"content": ("c.png", _png(), "image/png")}).status_code == 422
    for method, path in [("get", "/style/jobs/nope"), ("delete", "/style/jobs/nope"),
                         ("get", "/style/jobs/nope/result.png")]:
        assert getattr(client, method)(path).status_code == 404


def test_auth_dependency_guards_every_route(jobs: StyleJobs) -> None:
    def require_role(x_role: str | None = Header(default=None)) -> None:
        if x_role != "operator":
            raise HTTPException(403, detail="operator role required")

    client = _client(jobs, require_role)
    assert client.post("/style/jobs", files=_files(), data={"params": SMALL}).status_code == 403
    assert client.get("/style/jobs/anything").status_code == 403
    ok = client.post("/style/jobs", files=_files(), headers={"X-Role": "operator"},
                     data={"params": json.dumps({"size": 32, "iters": 1})})
    assert ok.status_code == 202
    assert client.get(f"/style/jobs/{ok.json()['id']}", headers={"X-Role": "operator"}).status_code == 200


def test_service_refuses_missing_weights_and_closes_idempotently() -> None:
    with pytest.raises(ValueError, match="weights"):
        StyleConfig()
    service = StyleJobs(StyleConfig(random_weights=True))
    job_id = service.submit(_png(), _png(), None)
    service.close()
    service.close()
    assert service.status(job_id).state in {JobState.CANCELLED, JobState.DONE}
    with pytest.raises(StyleJobError, match="closed"):
        service.submit(_png(), _png())
