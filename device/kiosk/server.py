"""The kiosk's HTTP server (stdlib ``ThreadingHTTPServer``), and ``start_kiosk`` that plugs it into an agent.

Routes (GET only):

- ``/kiosk``: the page (``static/kiosk.html``, its CSS and script under ``/kiosk/static/``);
- ``/kiosk/state``: the screen's model as JSON (``device.kiosk.screen.KioskState``);
- ``/kiosk/preview.mjpg``: the live preview, ``multipart/x-mixed-replace`` JPEGs at most
  ``preview_fps`` per second, at most ``max_clients`` streams at once.

Everything is ``Cache-Control: no-store`` with a strict same-origin CSP. Bound to loopback (the default),
the server also refuses requests whose ``Host`` is not a loopback name, so a web page the kiosk browser
might open cannot read the preview through DNS rebinding. A server that cannot bind logs why and the
door runs on without its screen: the screen must never stop the door.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from device.agent.loop import Agent
from device.kiosk.config import KioskConfig, is_loopback
from device.kiosk.preview import Preview
from device.kiosk.screen import KioskScreen
from device.liveness.challenge import ChallengeReporter

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
STATIC_FILES = {"kiosk.css": "text/css; charset=utf-8", "kiosk.js": "text/javascript; charset=utf-8"}
PAGE_FILE = "kiosk.html"
BOUNDARY = "facegate-frame"
# A stream wakes this often to notice shutdown and a client that went away.
STREAM_POLL_S = 0.5
# Seconds a client has to send its request line and headers (slow clients cannot pin threads).
REQUEST_TIMEOUT_S = 10.0
# close() waits this long for the serving thread.
JOIN_TIMEOUT_S = 2.0
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                "connect-src 'self'; base-uri 'none'; form-action 'none'; "
                                "frame-ancestors 'none'"),
}


class _Server(ThreadingHTTPServer):
    """Carries the kiosk's parts to the handlers."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], kiosk: KioskServer) -> None:
        self.kiosk = kiosk
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive for the page's state polling
    timeout = REQUEST_TIMEOUT_S

    def version_string(self) -> str:
        """The ``Server`` header: no Python or OS version."""
        return "facegate-kiosk"

    def log_message(self, format: str, *args: Any) -> None:
        """Access lines go to debug (no client addresses in the door's log)."""
        logger.debug("kiosk http: " + format, *args)

    def _send(self, code: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in SECURITY_HEADERS.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, code: HTTPStatus, text: str) -> None:
        self._send(code, json.dumps({"detail": text}).encode(), "application/json")

    def _host_allowed(self) -> bool:
        kiosk = self.server.kiosk
        if not kiosk.config.loopback:
            return True
        host = self.headers.get("Host", "")
        name = urlsplit(f"//{host}").hostname or ""
        return is_loopback(name)

    def do_HEAD(self) -> None:
        """Same as GET without the body (streams excluded)."""
        self.do_GET()

    def do_GET(self) -> None:
        """Route one request."""
        kiosk = self.server.kiosk
        if not self._host_allowed():
            self._error(HTTPStatus.MISDIRECTED_REQUEST, "the kiosk answers on loopback names only")
            return
        path = urlsplit(self.path).path
        if path in ("/", "/kiosk/"):
            self.send_response(HTTPStatus.FOUND)
            self.send_header("Location", "/kiosk")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/kiosk":
            self._send(HTTPStatus.OK, kiosk.page, "text/html; charset=utf-8")
        elif path == "/kiosk/state":
            try:
                body = json.dumps(kiosk.screen.state().as_dict(), ensure_ascii=False).encode()
            except Exception:  # the agent's status failed: say so, never a traceback to the screen
                logger.exception("kiosk state failed")
                self._error(HTTPStatus.SERVICE_UNAVAILABLE, "the door's state is unavailable")
                return
            self._send(HTTPStatus.OK, body, "application/json")
        elif path == "/kiosk/preview.mjpg" and self.command == "GET":
            self._stream()
        elif path.startswith("/kiosk/static/") and path.rsplit("/", 1)[1] in kiosk.static:
            name = path.rsplit("/", 1)[1]
            self._send(HTTPStatus.OK, kiosk.static[name], STATIC_FILES[name])
        else:
            self._error(HTTPStatus.NOT_FOUND, "not found")

    def _stream(self) -> None:
        kiosk = self.server.kiosk
        preview = kiosk.preview
        if preview is None:
            self._error(HTTPStatus.NOT_FOUND, "the preview is off ([kiosk] preview = false)")
            return
        if not kiosk.slots.acquire(blocking=False):
            self._error(HTTPStatus.SERVICE_UNAVAILABLE, "too many preview streams ([kiosk] max_clients)")
            return
        self.close_connection = True
        try:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={BOUNDARY}")
            self.send_header("Connection", "close")
            for key, value in SECURITY_HEADERS.items():
                self.send_header(key, value)
            self.end_headers()
            self._frames(preview, kiosk)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass  # the screen went away
        finally:
            kiosk.slots.release()

    def _frames(self, preview: Preview, kiosk: KioskServer) -> None:
        interval = 1.0 / kiosk.config.preview_fps
        sent, next_due = 0, 0.0
        while not kiosk.stopping.is_set():
            wait = next_due - time.monotonic()
            if wait > 0 and kiosk.stopping.wait(wait):
                return
            if preview.wait_newer(sent, STREAM_POLL_S) == sent:
                continue
            latest = preview.jpeg()
            if latest is None:
                continue
            sent, data = latest
            head = f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(data)}\r\n\r\n"
            self.wfile.write(head.encode("ascii") + data + b"\r\n")
            self.wfile.flush()
            kiosk.frames_sent += 1
            # Paced on a fixed grid: at most preview_fps per stream on average, without losing a frame
            # interval to phase jitter; a stream that fell behind (no new frame) restarts from now.
            now = time.monotonic()
            next_due = now if next_due < now - interval else next_due + interval


def _read_static() -> tuple[bytes, dict[str, bytes]]:
    page = (STATIC_DIR / PAGE_FILE).read_bytes()
    return page, {name: (STATIC_DIR / name).read_bytes() for name in STATIC_FILES}


class KioskServer:
    """The screen's HTTP server on its own thread; ``close()`` is idempotent."""

    def __init__(self, config: KioskConfig, screen: KioskScreen, preview: Preview | None) -> None:
        self.config = config
        self.screen = screen
        self.preview = preview
        self.page, self.static = _read_static()
        self.slots = threading.BoundedSemaphore(config.max_clients)
        self.stopping = threading.Event()
        self.frames_sent = 0
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> KioskServer:
        """Bind and serve in a background thread (raises OSError when the port cannot be bound)."""
        self._httpd = _Server((self.config.host, self.config.port), self)
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="kiosk-http", daemon=True)
        self._thread.start()
        return self

    @property
    def port(self) -> int:
        """The bound port (the configured one, or the one picked for port 0)."""
        return int(self._httpd.server_address[1]) if self._httpd is not None else self.config.port

    @property
    def url(self) -> str:
        """The page's address, as Chromium should open it."""
        host = self.config.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/kiosk"

    def close(self) -> None:
        """Stop serving and end every stream (safe to call twice)."""
        self.stopping.set()
        if self.preview is not None:
            self.preview.wake()
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        if self._thread is not None:
            self._thread.join(JOIN_TIMEOUT_S)
            self._thread = None


def start_kiosk(agent: Agent, online: Callable[[], bool] | None = None) -> KioskServer | None:
    """Serve the door screen for ``agent`` when ``[kiosk] enabled``; None when off or it cannot bind.

    ``online`` says whether the broker is connected (the offline badge); None for a standalone door.
    The screen is an event sink and frame observer of the agent, so it sees exactly what the door decides.
    """
    config = agent.config.kiosk
    if not config.enabled:
        return None
    reporter = agent.liveness if isinstance(agent.liveness, ChallengeReporter) else None
    screen = KioskScreen(config, agent.config.quality, agent, reporter, online)
    preview = Preview(config, screen.tone) if config.preview else None
    server = KioskServer(config, screen, preview)
    try:
        server.start()
    except OSError as exc:
        logger.error("kiosk screen cannot listen on %s:%d (%s): the door runs without its screen; free the "
                     "port or set [kiosk] port", config.host, config.port, exc)
        return None
    agent.add_sink(screen)
    agent.add_frame_observer(screen.observe)
    if preview is not None:
        agent.add_frame_observer(preview.observe)
    if not config.loopback:
        logger.warning("kiosk screen on %s, not loopback: other machines can watch the camera preview",
                       config.host)
    logger.info("kiosk screen at %s", server.url)
    return server
