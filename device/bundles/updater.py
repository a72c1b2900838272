"""The device's bundle traffic: announcements, chunks, chunk requests, gallery deltas, and acks.

paho's network thread only enqueues; one worker thread owns the download, the install and the acks,
so a 25 MB install never stalls keepalives or PUBACKs. Acks are retained on ``…/<device>/bundle/ack``:
``downloading`` with a percentage, ``verifying``, ``installed``, ``rejected``/``rolled_back`` with
a reason, plus the outcome of the latest gallery delta.

Nothing here assumes the broker kept anything (a broker restarted without persistence keeps no
retained message and no queued chunk):

- every connect re-publishes the ack: it is the door's hello, and the server answers a door that is
  behind by offering the announcement and the delta again (:mod:`server.bundles.offers`);
- a download interrupted by a restart resumes from its signed announcement on disk, without waiting
  for the announcement to be offered again;
- missing chunks are asked for when chunks stop arriving, at once after a reconnect, and again with a
  doubling interval while nobody answers (``request_idle_s`` up to :data:`REQUEST_BACKOFF_MAX_S`).
"""

from __future__ import annotations

import logging
import queue
import shutil
import threading
import time
import uuid
from collections.abc import Callable

from core.mqtt.client import Message, MqttClient
from core.protocol.chunks import decode_chunk
from core.protocol.schemas import (
    BundleAck,
    BundleAnnounce,
    BundleState,
    ChunkRequest,
    DeltaState,
    GalleryDelta,
    PayloadError,
    manifest_bytes,
    utcnow,
)
from core.protocol.topics import Topics
from device.bundles.download import ANNOUNCE_FILE, Download
from device.bundles.errors import BundleRejected, IncompleteDownload, RejectCode
from device.bundles.store import ActiveBundle, BundleStore
from device.config import BundleConfig
from device.gallery import GalleryError

logger = logging.getLogger(__name__)

# Work items waiting for the worker; beyond this, chunks are dropped (and asked for again later).
QUEUE_MAX = 4096
# Worker wake-up period: chunk-request timeouts are checked this often.
TICK_S = 0.25
# A progress ack at most every this many percent.
PROGRESS_STEP = 10.0
# Failures caused by the transfer (not the bundle itself) are retried when the server publishes again.
TRANSFER_CODES = frozenset({RejectCode.TAMPERED, RejectCode.TRUNCATED})
# Cap of the doubling interval between chunk requests nobody answers (no server running, a lost request).
REQUEST_BACKOFF_MAX_S = 60.0

LoadHook = Callable[[ActiveBundle], None]
# Makes an accepted delta live in the running door (removals in place first). Returns None when every change
# is live, or (state, reason) for a partial result; raising means the removals are not proven live, and the
# delta is acked ``rejected`` with the reason (the server keeps the deletion pending).
DeltaHook = Callable[[ActiveBundle, GalleryDelta], "tuple[DeltaState, str] | None"]


class BundleUpdater:
    """Receives bundles and deltas for one device; ``close()`` is idempotent."""

    def __init__(self, client: MqttClient, topics: Topics, device_id: str, store: BundleStore,
                 config: BundleConfig | None = None, *, on_installed: LoadHook | None = None,
                 on_gallery_changed: DeltaHook | None = None) -> None:
        self.client = client
        self.topics = topics
        self.device_id = device_id
        self.store = store
        self.config = config or BundleConfig()
        self.on_installed = on_installed
        self.on_gallery_changed = on_gallery_changed
        self.dropped = 0
        self._queue: queue.Queue[tuple[str, Message | None]] = queue.Queue(maxsize=QUEUE_MAX)
        self._stop = threading.Event()
        self._download: Download | None = None
        self._failed: dict[bytes, tuple[RejectCode, str]] = {}  # signed manifest -> failure
        self._last_progress = 0.0
        self._last_request = 0.0
        self._request_wait = self.config.request_idle_s  # doubles while requests go unanswered
        self._outstanding: set[tuple[int, int]] = set()
        self._acked_percent = -PROGRESS_STEP
        self._changed = threading.Condition()
        delta = store.load_signed_delta()
        running = store.running_sequence
        self.last_ack = BundleAck(device=device_id, sequence=running,
                                  state="installed" if running else "idle",
                                  percent=100.0 if running else 0.0, running_sequence=running or None,
                                  delta_sequence=delta.seq if delta else 0, ts=utcnow(),
                                  door_key=self._door_key)
        self._unsubscribe: list[Callable[[], None]] = []
        self._thread = threading.Thread(target=self._run, name="bundle-updater", daemon=True)

    @property
    def _door_key(self) -> str | None:
        """This door's public key for the ack (the hello): the server wraps gallery keys to it."""
        door = self.store.door
        return door.public_b64 if door is not None else None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> BundleUpdater:
        """Subscribe and start the worker."""
        t = self.topics
        self._unsubscribe = [
            self.client.subscribe(t.bundle_announce, self._enqueue("announce")),
            self.client.subscribe(t.all_bundle_chunks, self._enqueue("chunk")),
            self.client.subscribe(t.bundle_chunk_reply(self.device_id), self._enqueue("chunk")),
            self.client.subscribe(t.gallery_delta, self._enqueue("delta")),
            self.client.on_connected(lambda: self._put("ack", None)),
        ]
        self._thread.start()
        if self.client.connected:  # started on a live connection: say hello now, not at the next one
            self._put("ack", None)
        return self

    def close(self) -> None:
        """Stop the worker and unsubscribe (safe to call twice); partial downloads stay on disk."""
        self._stop.set()
        for undo in self._unsubscribe:
            undo()
        self._unsubscribe = []
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)

    def sync(self) -> None:
        """Re-announce our state, forget transfer failures, ask for missing chunks now."""
        self._put("sync", None)

    @property
    def running_sequence(self) -> int:
        """Bundle in use (0: none)."""
        return self.store.running_sequence

    @property
    def delta_sequence(self) -> int:
        """Latest gallery delta processed."""
        return self.last_ack.delta_sequence

    def wait_for(self, predicate: Callable[[BundleAck], bool], timeout: float) -> bool:
        """Block until ``predicate(last_ack)`` holds or ``timeout``; returns whether it holds."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self.last_ack), timeout)

    # ------------------------------------------------------------------ network thread

    def _enqueue(self, kind: str) -> Callable[[Message], None]:
        def handler(message: Message) -> None:
            self._put(kind, message)
        return handler

    def _put(self, kind: str, message: Message | None) -> None:
        try:
            self._queue.put_nowait((kind, message))
        except queue.Full:
            self.dropped += 1
            if self.dropped % 100 == 1:
                logger.warning("bundle queue full: dropped %d messages (chunks are asked for again)",
                               self.dropped)

    # ------------------------------------------------------------------ worker thread

    def _run(self) -> None:
        try:
            self._resume()
        except Exception:
            logger.exception("resuming a partial bundle download failed")
        while not self._stop.is_set():
            try:
                kind, message = self._queue.get(timeout=TICK_S)
            except queue.Empty:
                kind, message = "tick", None
            try:
                self._dispatch(kind, message)
            except Exception:
                logger.exception("bundle updater failed on a %s message", kind)

    def _dispatch(self, kind: str, message: Message | None) -> None:
        if kind == "announce" and message is not None:
            self._on_announce(message)
        elif kind == "chunk" and message is not None:
            self._on_chunk(message.payload)
        elif kind == "delta" and message is not None:
            self._on_delta(message.payload)
        elif kind == "sync":
            self._failed = {k: v for k, v in self._failed.items() if v[0] not in TRANSFER_CODES}
            self._request_soon()
            self._publish_ack(self.last_ack)
        elif kind == "ack":  # (re)connected: say hello, and ask at once for what a download misses
            self._request_soon()
            self._publish_ack(self.last_ack)
        self._maybe_request()

    def _request_soon(self) -> None:
        """Ask for missing chunks at the next check, not after the idle interval."""
        self._last_progress = 0.0
        self._last_request = 0.0
        self._request_wait = self.config.request_idle_s

    def _resume(self) -> None:
        """Go on with a download a restart interrupted, from the signed announcement it saved."""
        root = self.store.downloads_dir()
        if not root.is_dir():
            return
        running = self.store.running_sequence
        folders = sorted((p for p in root.iterdir() if p.name.isdigit()), key=lambda p: int(p.name),
                         reverse=True)
        for folder in folders:
            try:
                announce = BundleAnnounce.parse((folder / ANNOUNCE_FILE).read_bytes())
            except (OSError, PayloadError):
                continue
            if announce.manifest.sequence <= running or announce.manifest.sequence != int(folder.name):
                continue
            try:
                self.store.check_announce(announce)
            except BundleRejected as exc:
                logger.warning("partial download %s dropped: %s", folder.name, exc)
                shutil.rmtree(folder, ignore_errors=True)
                continue
            logger.info("bundle %d: resuming the download saved before the restart",
                        announce.manifest.sequence)
            self._start_download(announce)
            return

    def _ack(self, sequence: int, state: BundleState, percent: float = 0.0, reason: str | None = None,
             delta: tuple[int, DeltaState, str | None] | None = None) -> None:
        last = self.last_ack
        running = self.store.running_sequence
        d_seq, d_state, d_reason = delta or (last.delta_sequence, last.delta_state, last.delta_reason)
        ack = BundleAck(device=self.device_id, sequence=sequence, state=state, percent=round(percent, 1),
                        reason=reason[:256] if reason else None, running_sequence=running or None,
                        delta_sequence=d_seq, delta_state=d_state,
                        delta_reason=d_reason[:256] if d_reason else None, ts=utcnow(),
                        door_key=self._door_key)
        self._publish_ack(ack)

    def _ack_delta(self, seq: int, state: DeltaState, reason: str | None) -> None:
        last = self.last_ack
        self._ack(last.sequence, last.state, last.percent, last.reason, (seq, state, reason))

    def _publish_ack(self, ack: BundleAck) -> None:
        with self._changed:
            self.last_ack = ack
            self._changed.notify_all()
        self.client.publish(self.topics.bundle_ack(self.device_id), ack.to_bytes(), qos=1, retain=True)

    def _on_announce(self, message: Message) -> None:
        try:
            announce = BundleAnnounce.parse(message.payload)
        except PayloadError as exc:
            logger.warning("ignoring a malformed bundle announcement: %s", exc)
            return
        seq = announce.manifest.sequence
        key = _failure_key(announce)
        if seq == self.store.running_sequence and self._is_running(announce):
            if self.last_ack.sequence != seq or self.last_ack.state != "installed":
                self._ack(seq, "installed", 100.0)
            return
        if self._download is not None and self._download.sequence == seq:
            if manifest_bytes(self._download.manifest) != manifest_bytes(announce.manifest):
                # A sequence names one manifest: a second one for the same number is refused (checked
                # first, so a forgery is reported as such), and the download under way goes on.
                try:
                    self.store.check_announce(announce)
                    raise BundleRejected(RejectCode.REPLAY, f"bundle {seq} is already being downloaded "
                                         "with a different manifest")
                except BundleRejected as exc:
                    self._reject(seq, key, exc)
            return
        failed = self._failed.get(key)
        if failed is not None and (failed[0] not in TRANSFER_CODES or message.retain):
            state: BundleState = "rolled_back" if failed[0] is RejectCode.LOAD_FAILED else "rejected"
            self._ack(seq, state, 0.0, failed[1])
            return
        try:
            self.store.check_announce(announce)
        except BundleRejected as exc:
            self._reject(seq, key, exc)
            return
        self._start_download(announce)

    def _is_running(self, announce: BundleAnnounce) -> bool:
        """Whether ``announce`` carries exactly the running bundle's manifest."""
        active = self.store.active()
        return active is not None and manifest_bytes(active.manifest) == manifest_bytes(announce.manifest)

    def _start_download(self, announce: BundleAnnounce) -> None:
        seq = announce.manifest.sequence
        if self._download is not None:
            self._download.discard()
        for stale in self.store.downloads_dir().iterdir():
            if stale.name != str(seq):
                shutil.rmtree(stale, ignore_errors=True)
        self._download = Download(self.store.downloads_dir() / str(seq), announce)
        self._outstanding.clear()
        self._last_progress = time.monotonic()
        self._acked_percent = -PROGRESS_STEP
        logger.info("bundle %d announced (%d files, %.1f MB): downloading", seq, len(announce.manifest.files),
                    announce.manifest.total_size / 1e6)
        self._progress()
        if self._download.complete:
            self._install()

    def _progress(self) -> None:
        dl = self._download
        if dl is not None and dl.percent - self._acked_percent >= PROGRESS_STEP:
            self._acked_percent = dl.percent
            self._ack(dl.sequence, "downloading", dl.percent)

    def _on_chunk(self, frame: bytes) -> None:
        dl = self._download
        if dl is None:
            return
        try:
            header, data = decode_chunk(frame)
        except PayloadError as exc:
            logger.debug("dropping a bad chunk: %s", exc)
            return
        if header.sequence != dl.sequence:
            return
        try:
            new = dl.add(header, data)
        except BundleRejected as exc:
            self._abort(exc)
            return
        if new:
            self._last_progress = time.monotonic()
            self._request_wait = self.config.request_idle_s
            self._outstanding.discard((header.file_index, header.index))
            self._progress()
            if dl.complete:
                self._install()

    def _maybe_request(self) -> None:
        dl = self._download
        if dl is None or dl.complete or not self.client.connected:
            return
        now = time.monotonic()
        idle = now - max(self._last_progress, self._last_request) >= self._request_wait
        batch_done = self._last_request > 0.0 and not self._outstanding
        if not (idle or batch_done):
            return
        refs = dl.missing(self.config.request_batch)
        if not refs:
            return
        if idle and self._last_request > self._last_progress:  # the last request went unanswered
            self._request_wait = min(REQUEST_BACKOFF_MAX_S, self._request_wait * 2)
        request = ChunkRequest(device=self.device_id, sequence=dl.sequence, correlation_id=uuid.uuid4().hex,
                               chunks=refs)
        self._outstanding = {(r.file_index, r.index) for r in refs}
        self._last_request = now
        logger.debug("bundle %d: asking for %d chunks (%s)", dl.sequence, len(refs), request.correlation_id)
        self.client.publish(self.topics.bundle_request(self.device_id), request.to_bytes(), qos=1)

    def _install(self) -> None:
        dl = self._download
        assert dl is not None  # noqa: S101 - only called with a download
        seq = dl.sequence
        key = _failure_key(dl.announce)
        self._ack(seq, "verifying", 100.0)
        try:
            bundle = self.store.install(dl.announce, dl.assemble, load_check=self.on_installed)
        except IncompleteDownload as exc:
            logger.warning("%s", exc)
            self._last_request = 0.0
            return
        except BundleRejected as exc:
            self._reject(seq, key, exc)
            dl.discard()
            self._download = None
            return
        except (OSError, GalleryError) as exc:
            self._reject(seq, key, BundleRejected(RejectCode.CORRUPT, f"install failed: {exc}"))
            dl.discard()
            self._download = None
            return
        dl.discard()
        self._download = None
        self._ack(seq, "installed", 100.0)
        logger.info("bundle %d installed", bundle.sequence)
        delta = self.store.load_signed_delta()
        if delta is not None:  # already in the new working gallery; ack it for this bundle
            self._apply_delta(delta, reload=False)

    def _abort(self, exc: BundleRejected) -> None:
        dl = self._download
        assert dl is not None  # noqa: S101 - only called with a download
        self._reject(dl.sequence, _failure_key(dl.announce), exc)
        dl.discard()
        self._download = None

    def _reject(self, seq: int, key: bytes, exc: BundleRejected) -> None:
        logger.error("bundle %d rejected, keeping bundle %s: %s", seq, self.store.running_sequence or "none",
                     exc)
        self._failed[key] = (exc.code, exc.reason)
        state: BundleState = "rolled_back" if exc.code is RejectCode.LOAD_FAILED else "rejected"
        self._ack(seq, state, 0.0, exc.reason)

    def _on_delta(self, payload: bytes) -> None:
        try:
            delta = GalleryDelta.parse(payload)
        except PayloadError as exc:
            logger.warning("ignoring a malformed gallery delta: %s", exc)
            return
        if delta.seq == self.last_ack.delta_sequence and self.last_ack.delta_state not in (None, "rejected"):
            return  # a rejected delta is tried again when it is offered again
        self._apply_delta(delta, reload=True)

    def _apply_delta(self, delta: GalleryDelta, reload: bool) -> None:
        door = self.store.door
        versions = door.versions if door is not None else []
        try:
            try:
                outcome = self.store.accept_delta(delta)
            finally:
                if door is not None and door.versions != versions:
                    # A new gallery key: a bundle refused for lacking it may open now.
                    self._failed = {k: v for k, v in self._failed.items()
                                    if v[0] is not RejectCode.NO_GALLERY_KEY}
        except BundleRejected as exc:
            logger.error("gallery delta %d rejected: %s", delta.seq, exc)
            if exc.code is RejectCode.REPLAY:
                return
            self._ack_delta(delta.seq, "rejected", exc.reason)
            return
        except (OSError, GalleryError) as exc:
            logger.error("gallery delta %d could not be applied: %s", delta.seq, exc)
            self._ack_delta(delta.seq, "rejected", f"apply failed: {exc}")
            return
        state, reason = outcome.state, outcome.reason
        active = self.store.active()
        hook = self.on_gallery_changed if reload else None
        if hook is not None and active is not None and state != "rejected":
            try:
                opened = self.store.load_delta()  # the hook needs the plaintext the store opened
                if opened is None or opened.seq != delta.seq:
                    raise BundleRejected(RejectCode.CORRUPT, "the accepted delta cannot be read back")
                partial = hook(active, opened)
            except Exception as exc:  # the running door may still know a removed person: never ack applied
                logger.error("gallery delta %d is not live in the running door: %s", delta.seq, exc)
                state, reason = "rejected", f"not live in the running door: {exc}"
            else:
                if partial is not None:
                    state, reason = partial
        logger.info("gallery delta %d: %s (-%d persons, +%d templates)", delta.seq, state,
                    outcome.removed, outcome.added)
        self._ack_delta(delta.seq, state, reason)


def _failure_key(announce: BundleAnnounce) -> bytes:
    """Identity of an announcement for remembering failures: the manifest and its signature."""
    return manifest_bytes(announce.manifest) + b"\x00" + (announce.signature or "").encode("ascii")
