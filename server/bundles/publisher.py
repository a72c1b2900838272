"""Publish a bundle (retained announcement, then every chunk at QoS 1), answer chunk requests, and keep
offering the announcement.

Requests arrive on each device's own ``…/<device>/bundle/request`` (the broker ACL lets only that door
write there, and a request naming another device is dropped) from devices that missed chunks (late
joiners, restarts, broker restarts); the chunks go back on the requesting device's own
``…/<device>/bundle/chunk`` topic with the request's correlation id. A worker thread does the file reads,
never paho's network thread. A flooding door cannot starve the others: requests are rate limited per
device, queued per device (a few each) and served round-robin, each capped at
``MAX_CHUNKS_PER_REQUEST`` chunks, and at most ``MAX_INFLIGHT_CHUNKS`` chunks wait unacknowledged in the
client's publish queue. So while another door has a request pending, a flooder gets at most one
request's worth of chunks between two of that door's requests.

The announcement is never assumed retained: the latest published bundle (remembered in
``<root>/published.json``, so a restarted server offers it too) is offered again on reconnect, to a
door whose hello shows it never heard of it, and periodically (:mod:`server.bundles.offers`).
"""

from __future__ import annotations

import collections
import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from core.files import atomic_write_bytes
from core.mqtt.client import Message, MqttClient, PublishHandle, shared
from core.protocol.chunks import make_chunk
from core.protocol.schemas import BundleAck, BundleAnnounce, ChunkRequest, PayloadError
from core.protocol.topics import Topics
from device.bundles.errors import RejectCode
from device.waiting import WaitTimeout, wait_progress
from server.auth.ratelimit import TokenBucket
from server.bundles.builder import BuiltBundle, BundleBuildError, iter_chunks, load_bundle, read_chunk
from server.bundles.offers import OFFER_INTERVAL_S, OfferKeeper

logger = logging.getLogger(__name__)

# Pending chunk requests; beyond this, requests are dropped (the device asks again after a timeout).
REQUEST_QUEUE_MAX = 1024
# Pending requests per device; beyond this the device's newest is dropped (it asks again).
REQUESTS_PER_DEVICE_MAX = 4
# Chunks answered per request (a request may name more; the device asks for the rest next time).
MAX_CHUNKS_PER_REQUEST = 256
# Per-device request budget: sustained requests per minute, and a burst (a resuming door asks quickly).
REQUESTS_PER_MINUTE = 120.0
REQUEST_BURST = 20
# Chunks published but not yet acknowledged by the broker; the worker waits beyond this (bounded memory).
MAX_INFLIGHT_CHUNKS = 64
# publish(wait=True) waits for the broker to acknowledge the chunks; it gives up only when no
# acknowledgement at all arrived for this long (a dead broker), however long the whole bundle takes.
PUBLISH_STALL_S = 120.0
PUBLISHED_FILE = "published.json"  # {"sequence": N}: the bundle on offer


class PublishStalled(WaitTimeout):
    """The broker stopped acknowledging a bundle's chunks."""


def published_sequence(root: Path) -> int | None:
    """The bundle last published from ``root`` (None: none yet, or the record is unreadable)."""
    try:
        return int(json.loads((Path(root) / PUBLISHED_FILE).read_text(encoding="utf-8"))["sequence"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("%s is unreadable (%s): no bundle is offered until the next publish",
                       Path(root) / PUBLISHED_FILE, exc)
        return None


class BundleServer:
    """Serves the bundles under ``root`` (``root/<seq>/bundle.json``) and offers the latest published one;
    a context manager."""

    name = "bundle announcement"

    def __init__(self, client: MqttClient, topics: Topics, root: Path, *,
                 offer_interval_s: float = OFFER_INTERVAL_S, share_group: str | None = None) -> None:
        self.client = client
        self.share_group = share_group  # replicas: each chunk request reaches one of them
        self.topics = topics
        self.root = Path(root)
        self.served_requests = 0
        self._cache: dict[int, BuiltBundle] = {}
        self._pending: dict[str, collections.deque[ChunkRequest]] = {}
        self._turns: collections.deque[str] = collections.deque()  # devices with requests, in turn
        self._queued = 0
        self._wake = threading.Condition()
        self._budget = TokenBucket(REQUESTS_PER_MINUTE, REQUEST_BURST)
        self._inflight: collections.deque[PublishHandle] = collections.deque()
        self.dropped_requests = 0
        # ("queued" | "served", device, chunks sent): what a fairness check reads.
        self.served_log: collections.deque[tuple[str, str, int]] = collections.deque(maxlen=100_000)
        self._stop = threading.Event()
        self._unsubscribe: Callable[[], None] | None = None
        self._thread = threading.Thread(target=self._run, name="bundle-server", daemon=True)
        self.current: BuiltBundle | None = None
        self.refresh()
        self.offers = OfferKeeper(client, topics, [self], interval_s=offer_interval_s)

    def start(self) -> BundleServer:
        """Subscribe to chunk requests, start answering them, and keep offering the current bundle."""
        self._unsubscribe = self.client.subscribe(shared(self.share_group, self.topics.all_bundle_requests),
                                                  self._on_request)
        self._thread.start()
        self.offers.start()
        return self

    def close(self) -> None:
        """Stop answering and offering (safe to call twice)."""
        self.offers.close()
        self._stop.set()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def __enter__(self) -> BundleServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def bundle(self, sequence: int) -> BuiltBundle | None:
        """The bundle ``sequence`` from ``root`` (cached), or None."""
        if sequence not in self._cache:
            try:
                self._cache[sequence] = load_bundle(self.root / str(sequence))
            except BundleBuildError:
                return None
        return self._cache[sequence]

    def publish(self, bundle: BuiltBundle, *, chunks: bool = True, wait: bool = False) -> int:
        """Publish the retained announcement and (by default) every chunk, and offer this bundle from now
        on; return the chunk count. ``wait``: block while the broker keeps acknowledging the chunks."""
        seq = bundle.manifest.sequence
        self._cache[seq] = bundle
        self.current = bundle
        if bundle.path.parent.resolve() == self.root.resolve():
            atomic_write_bytes(self.root / PUBLISHED_FILE, json.dumps({"sequence": seq}).encode("utf-8"))
        announce = self.publish_announce(bundle.announce)
        handles: list[PublishHandle] = [announce]
        count = 0
        if chunks:
            topic = self.topics.bundle_chunk(seq)
            for file_index, index, total, data in iter_chunks(bundle):
                frame = make_chunk(seq, file_index, index, total, data)
                handles.append(self.client.publish(topic, frame, qos=1))
                count += 1
        if wait:
            self._wait_acknowledged(seq, handles)
        logger.info("bundle %d published: announcement and %d chunks", seq, count)
        return count

    @staticmethod
    def _wait_acknowledged(seq: int, handles: list[PublishHandle]) -> None:
        """Wait while the broker keeps acknowledging; fail only when none arrives for PUBLISH_STALL_S."""

        def unacked() -> int:
            return sum(1 for handle in handles if not handle.is_published())

        try:
            wait_progress(lambda: unacked() == 0, f"the broker to acknowledge bundle {seq}'s "
                          f"{len(handles)} messages", stall_s=PUBLISH_STALL_S, progress=unacked)
        except WaitTimeout as exc:
            raise PublishStalled(str(exc)) from exc

    def publish_announce(self, announce: BundleAnnounce) -> PublishHandle:
        """Publish (retained, QoS 1) an announcement as is."""
        return self.client.publish(self.topics.bundle_announce, announce.to_bytes(), qos=1, retain=True)

    def refresh(self) -> BuiltBundle | None:
        """The bundle on offer: this server's latest publish, or a newer one another process recorded."""
        seq = published_sequence(self.root)
        current = self.current
        if seq is not None and (current is None or seq > current.manifest.sequence):
            found = self.bundle(seq)
            if found is not None:
                self.current = current = found
        return current

    def offer(self) -> bool:
        """Publish the current bundle's announcement again (False: nothing published yet)."""
        current = self.refresh()
        if current is None:
            return False
        self.publish_announce(current.announce)
        logger.debug("bundle %d offered again", current.manifest.sequence)
        return True

    def behind(self, ack: BundleAck) -> bool:
        """True when the door never heard of the current bundle (nor runs a newer one), or refused it for
        want of the gallery key: a door trusted after the bundle was built gets the key with the next
        delta and can open the bundle then, so it is offered again on the door's next ack."""
        current = self.current
        if current is None:
            return False
        seq = current.manifest.sequence
        if (ack.running_sequence or 0) >= seq:
            return False
        keyless = (ack.sequence == seq and ack.state == "rejected"
                   and (ack.reason or "").startswith(RejectCode.NO_GALLERY_KEY.value))
        return ack.sequence < seq or keyless

    def _on_request(self, message: Message) -> None:
        try:
            request = ChunkRequest.parse(message.payload)
        except PayloadError as exc:
            logger.warning("ignoring a malformed chunk request: %s", exc)
            return
        sender = self.topics.device_of(message.topic)
        if sender != request.device:
            self._drop(f"a chunk request on {sender}'s topic names device {request.device}")
            return
        if self._budget.take(f"chunks:{sender}") > 0:
            self._drop(f"{sender} is over its chunk request rate")
            return
        with self._wake:
            pending = self._pending.setdefault(sender, collections.deque())
            if len(pending) >= REQUESTS_PER_DEVICE_MAX or self._queued >= REQUEST_QUEUE_MAX:
                self._drop(f"chunk request queue full for {sender} (the device will ask again)")
                return
            if not pending:
                self._turns.append(sender)
            pending.append(request)
            self._queued += 1
            self.served_log.append(("queued", sender, 0))
            self._wake.notify()

    def _drop(self, why: str) -> None:
        self.dropped_requests += 1
        logger.warning("dropping a chunk request: %s", why)

    def _next(self) -> ChunkRequest | None:
        """The next request, round-robin over devices (None after a short wait with nothing queued)."""
        with self._wake:
            if not self._turns:
                self._wake.wait(0.2)
            if not self._turns:
                return None
            device = self._turns.popleft()
            pending = self._pending[device]
            request = pending.popleft()
            self._queued -= 1
            if pending:
                self._turns.append(device)  # its next request waits for every other device's turn
            else:
                del self._pending[device]
            return request

    def _run(self) -> None:
        while not self._stop.is_set():
            request = self._next()
            if request is None:
                continue
            try:
                self._answer(request)
            except Exception:
                logger.exception("answering a chunk request failed")

    def _publish_bounded(self, topic: str, frame: bytes) -> None:
        """Publish one chunk, first waiting while MAX_INFLIGHT_CHUNKS are still unacknowledged."""
        while len(self._inflight) >= MAX_INFLIGHT_CHUNKS and not self._stop.is_set():
            oldest = self._inflight[0]
            if oldest.is_published() or not oldest.queued:
                self._inflight.popleft()
                continue
            oldest.wait_for_publish(0.5)
            if not oldest.is_published() and not self.client.connected:
                self._inflight.popleft()  # disconnected: paho keeps it; stop counting it here
        self._inflight.append(self.client.publish(topic, frame, qos=1))

    def _answer(self, request: ChunkRequest) -> None:
        bundle = self.bundle(request.sequence)
        if bundle is None:
            logger.warning("device %s asked for chunks of bundle %d, which is not in %s", request.device,
                           request.sequence, self.root)
            return
        manifest = bundle.manifest
        topic = self.topics.bundle_chunk_reply(request.device)
        sent = 0
        for ref in request.chunks[:MAX_CHUNKS_PER_REQUEST]:
            if ref.file_index >= len(manifest.files) or ref.index >= manifest.chunk_count(ref.file_index):
                continue
            data = read_chunk(bundle, ref.file_index, ref.index)
            total = manifest.chunk_count(ref.file_index)
            frame = make_chunk(manifest.sequence, ref.file_index, ref.index, total, data,
                               correlation_id=request.correlation_id)
            self._publish_bounded(topic, frame)
            sent += 1
        self.served_requests += 1
        self.served_log.append(("served", request.device, sent))
        logger.debug("sent %d chunks of bundle %d to %s (%s)", sent, manifest.sequence, request.device,
                     request.correlation_id)
