"""Server hardening (issue 18) against a live uvicorn server and real SQLite: streaming body limit,
login limits, user disable and token revocation, secure cookies and HSTS."""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from server.app import create_app
from tests.conftest import free_port
from tests.server_support import make_config

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
        readable, writable, _ = select.select([sock], [sock], [], START_S)
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
