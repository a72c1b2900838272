"""Server hardening (issue 18) against a live uvicorn server and real SQLite: streaming body limit,
login limits, user disable and token revocation, secure cookies and HSTS."""

from __future__ import annotations

import os
import select as io_select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from click.testing import CliRunner
from fastapi import HTTPException
from fastapi.testclient import TestClient
from sqlalchemy import select

from server.api.auth import login_or_raise
from server.api.schemas import LoginRequest
from server.app import create_app
from server.auth.ratelimit import FailureAggregator
from server.cli import cli as server_cli
from server.db.models import ApiToken, AuditEntry
from tests.conftest import free_port
from tests.server_support import VIEWER_PASSWORD, add_viewer, login, make_config, state_of

START_S = 60.0  # a hang guard for uvicorn's start, never a timing claim
STREAM_TOTAL = 1 << 30  # the hostile client offers 1 GiB
STREAM_CHUNK = 64 * 1024
MAX_BYTES = 1 << 20  # upload.max_bytes: with max_files=1 the body limit is 1 MiB + FORM_OVERHEAD_BYTES
# Socket buffers on both sides and uvicorn's read-ahead may swallow this much past the limit.
SLACK_BYTES = 16 << 20
# RSS growth allowed while the 1 GiB stream is refused (the interpreter allocates a little meanwhile).
RSS_SLACK_BYTES = 64 << 20


def _rss() -> int:
    """This process's resident set size in bytes (uvicorn runs in a thread of it)."""
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class LiveServer:
    """create_app served by uvicorn on a free port in a background thread."""

    def __init__(self, tmp: Path, **sections: Any) -> None:
        self.port = free_port()
        self.app = create_app(make_config(tmp, **sections), start_mqtt=False)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + START_S
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)

    def close(self) -> None:
        """Stop uvicorn."""
        self.server.should_exit = True
        self.thread.join(START_S)


@pytest.fixture()
def live(tmp_path: Path) -> Iterator[LiveServer]:
    server = LiveServer(tmp_path, upload={"max_files": 1, "max_bytes": MAX_BYTES})
    try:
        yield server
    finally:
        server.close()


def test_chunked_hostile_body_is_cut_off_with_413(live: LiveServer) -> None:
    """An anonymous chunked POST offering 1 GiB is answered 413 after about the limit, RSS flat."""
    rss_before = _rss()
    sock = socket.create_connection(("127.0.0.1", live.port), timeout=START_S)
    sock.sendall(b"POST /api/enroll HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
                 b"Content-Type: multipart/form-data; boundary=x\r\n\r\n")
    # A well-formed multipart start, then one endless file part: only the byte count can stop it.
    head = b'--x\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\n'
    sock.sendall(f"{len(head):x}\r\n".encode() + head + b"\r\n")
    chunk = f"{STREAM_CHUNK:x}\r\n".encode() + b"\0" * STREAM_CHUNK + b"\r\n"
    sent = 0
    answer = b""
    peak_rss = rss_before
    while sent < STREAM_TOTAL:  # bounded: at most the 1 GiB the client offers
        readable, writable, _ = io_select.select([sock], [sock], [], START_S)
        if readable:
            answer = sock.recv(65536)
            break
        assert writable, "the server neither read the body nor answered"
        try:
            sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            break
        sent += STREAM_CHUNK
        if sent % (8 << 20) == 0:
            peak_rss = max(peak_rss, _rss())
    if not answer:
        answer = sock.recv(65536)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < STREAM_TOTAL // 16, f"the server read {sent} bytes before refusing"
    assert sent <= 2 * MAX_BYTES + (1 << 20) + SLACK_BYTES, sent
    peak_rss = max(peak_rss, _rss())
    assert peak_rss - rss_before < RSS_SLACK_BYTES, (rss_before, peak_rss)


@pytest.fixture()
def api(tmp_path: Path, db_url: str) -> Iterator[TestClient]:
    config = make_config(tmp_path, db_url, auth={"login_per_minute": 4, "login_global_per_minute": 1000})
    with TestClient(create_app(config, start_mqtt=False)) as test_client:
        yield test_client


@pytest.fixture()
def admin_api(tmp_path: Path, db_url: str) -> Iterator[TestClient]:
    with TestClient(create_app(make_config(tmp_path, db_url), start_mqtt=False)) as test_client:
        yield test_client


def _audit_rows(client: TestClient, action: str) -> list[AuditEntry]:
    with state_of(client).db.transaction() as session:
        rows = session.scalars(select(AuditEntry).where(AuditEntry.action == action)).all()
        session.expunge_all()
        return list(rows)


def test_hostile_login_cycling_user_names_is_limited_per_address(api: TestClient) -> None:
    """Each attempt under a new user name still spends the address's budget: the 5th is 429."""
    codes = [api.post("/api/auth/login", json={"username": f"nobody{i}", "password": "x" * 12}).status_code
             for i in range(5)]
    assert codes[:4] == [401] * 4 and codes[4] == 429, codes


def test_hostile_login_global_limit_spans_addresses(tmp_path: Path) -> None:
    """Attempts from many addresses share one global budget (bounded argon2 work)."""
    config = make_config(tmp_path, auth={"login_per_minute": 100, "login_global_per_minute": 3})
    with TestClient(create_app(config, start_mqtt=False)) as client:
        state = state_of(client)
        outcomes = []
        for i in range(4):
            with state.db.session() as session:
                try:
                    login_or_raise(state, session, LoginRequest(username="admin", password="wrong-password"),
                                   f"10.0.0.{i}")
                except HTTPException as exc:
                    outcomes.append(exc.status_code)
        assert outcomes == [401, 401, 401, 429], outcomes


def test_hostile_failed_logins_are_aggregated_in_the_audit_log(api: TestClient) -> None:
    """Many failures from one address make one audit row carrying the count, not one row each."""
    for i in range(4):
        api.post("/api/auth/login", json={"username": f"guess{i}", "password": "x" * 12})
    rows = _audit_rows(api, "login_failed")
    assert len(rows) == 1, [r.detail for r in rows]
    clock = [0.0]
    aggregator = FailureAggregator(60.0, clock=lambda: clock[0])
    reports = [aggregator.note("10.0.0.1", f"u{i}") for i in range(50)]
    assert reports[0] == (1, ["u0"]) and all(r is None for r in reports[1:])
    clock[0] = 61.0
    count, names = aggregator.note("10.0.0.1", "last") or (0, [])
    assert count == 50 and len(names) <= 10  # the 49 held back plus this one, in one report


def test_revoke_user_tokens_and_disable_through_the_api(admin_api: TestClient) -> None:
    """An admin revokes a viewer's tokens, revokes one token by id, disables and enables the user."""
    admin = login(admin_api)
    viewer = add_viewer(admin_api)
    assert admin_api.get("/api/auth/me", headers=viewer).status_code == 200
    response = admin_api.post("/api/users/viewer/revoke-tokens", headers=admin)
    assert response.status_code == 200 and response.json()["tokens_revoked"] == 1
    assert admin_api.get("/api/auth/me", headers=viewer).status_code == 401
    viewer = login(admin_api, "viewer", VIEWER_PASSWORD)
    with state_of(admin_api).db.transaction() as session:
        token_id = max(r.id for r in session.scalars(select(ApiToken)).all())
    assert admin_api.delete(f"/api/users/tokens/{token_id}", headers=admin).status_code == 204
    assert admin_api.get("/api/auth/me", headers=viewer).status_code == 401
    viewer = login(admin_api, "viewer", VIEWER_PASSWORD)
    assert admin_api.post("/api/users/viewer/disable", headers=viewer).status_code == 403  # admins only
    disabled = admin_api.post("/api/users/viewer/disable", headers=admin)
    assert disabled.status_code == 200 and disabled.json() == {"username": "viewer", "disabled": True,
                                                               "tokens_revoked": 1}
    assert admin_api.get("/api/auth/me", headers=viewer).status_code == 401
    assert admin_api.post("/api/auth/login", json={"username": "viewer",
                                             "password": VIEWER_PASSWORD}).status_code == 401
    assert admin_api.post("/api/users/admin/disable", headers=admin).status_code == 409  # the last admin
    assert admin_api.post("/api/users/viewer/enable", headers=admin).json()["disabled"] is False
    login(admin_api, "viewer", VIEWER_PASSWORD)
    rows = _audit_rows(admin_api, "user_disabled") + _audit_rows(admin_api, "tokens_revoked")
    actions = {r.action for r in rows}
    assert actions == {"user_disabled", "tokens_revoked"}


def test_revoke_user_through_the_cli(tmp_path: Path, db_url: str) -> None:
    """`facegate server disable-user` and `revoke-tokens` against the real database."""
    config = make_config(tmp_path, db_url)
    with TestClient(create_app(config, start_mqtt=False)) as client:
        viewer = add_viewer(client)
    toml = tmp_path / "server.toml"
    toml.write_text(f'data_dir = "{config.data_dir}"\n\n[database]\nurl = "{config.database_url}"\n',
                    encoding="utf-8")
    runner = CliRunner()
    revoked = runner.invoke(server_cli, ["revoke-tokens", "--config", str(toml), "--username", "viewer"])
    assert revoked.exit_code == 0 and "revoked 1 token" in revoked.output, revoked.output
    disabled = runner.invoke(server_cli, ["disable-user", "--config", str(toml), "--username", "viewer"])
    assert disabled.exit_code == 0, disabled.output
    missing = runner.invoke(server_cli, ["disable-user", "--config", str(toml), "--username", "ghost"])
    assert missing.exit_code != 0 and "no user" in missing.output
    with TestClient(create_app(config, start_mqtt=False)) as client:
        assert client.get("/api/auth/me", headers=viewer).status_code == 401
        assert client.post("/api/auth/login", json={"username": "viewer",
                                                    "password": VIEWER_PASSWORD}).status_code == 401
        enabled = runner.invoke(server_cli, ["disable-user", "--config", str(toml), "--username", "viewer",
                                             "--enable"])
        assert enabled.exit_code == 0
        login(client, "viewer", VIEWER_PASSWORD)


@pytest.mark.parametrize(("host", "secure"), [("127.0.0.1", False), ("::1", False), ("localhost", False),
                                              ("0.0.0.0", True), ("192.168.1.5", True)])  # noqa: S104
def test_hostile_secure_cookies_default_unless_loopback(tmp_path: Path, host: str, secure: bool) -> None:
    """secure_cookies defaults on unless bound to loopback; HSTS goes out exactly when it is on."""
    config = make_config(tmp_path, http={"host": host})
    assert config.http.secure_cookies is secure
    assert make_config(tmp_path, http={"host": host, "secure_cookies": False}).http.secure_cookies is False
    with TestClient(create_app(config, start_mqtt=False)) as client:
        hsts = client.get("/healthz").headers.get("strict-transport-security")
    assert (hsts is not None) is secure and (not secure or "max-age=31536000" in (hsts or ""))
