"""Publish a bundle (retained announcement, then every chunk at QoS 1), answer chunk requests, and keep
offering the announcement.

Requests arrive on ``…/bundles/request`` from devices that missed chunks (late joiners, restarts,
broker restarts); the chunks go back on the requesting device's own ``…/<device>/bundle/chunk`` topic
with the request's correlation id. A worker thread does the file reads, never paho's network thread.

The announcement is never assumed retained: the latest published bundle (remembered in
``<root>/published.json``, so a restarted server offers it too) is offered again on reconnect, to a
door whose hello shows it never heard of it, and periodically (:mod:`server.bundles.offers`).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from device.mqtt.client import Message, MqttClient, PublishHandle
from device.protocol.chunks import make_chunk
from device.protocol.schemas import BundleAck, BundleAnnounce, ChunkRequest, PayloadError
from device.protocol.topics import Topics
from device.waiting import WaitTimeout, wait_progress
from models.runtime.manifest import atomic_write_bytes
from server.bundles.builder import BuiltBundle, BundleBuildError, iter_chunks, load_bundle, read_chunk
from server.bundles.offers import OFFER_INTERVAL_S, OfferKeeper

logger = logging.getLogger(__name__)

# Pending chunk requests; beyond this, requests are dropped (the device asks again after a timeout).
REQUEST_QUEUE_MAX = 1024
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
                 offer_interval_s: float = OFFER_INTERVAL_S) -> None:
        self.client = client
        self.topics = topics
        self.root = Path(root)
        self.served_requests = 0
        self._cache: dict[int, BuiltBundle] = {}
        self._requests: queue.Queue[bytes] = queue.Queue(maxsize=REQUEST_QUEUE_MAX)
        self._stop = threading.Event()
        self._unsubscribe: Callable[[], None] | None = None
        self._thread = threading.Thread(target=self._run, name="bundle-server", daemon=True)
        self.current: BuiltBundle | None = None
        self.refresh()
        self.offers = OfferKeeper(client, topics, [self], interval_s=offer_interval_s)

    def start(self) -> BundleServer:
        """Subscribe to chunk requests, start answering them, and keep offering the current bundle."""
        self._unsubscribe = self.client.subscribe(self.topics.bundle_chunk_request, self._on_request)
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
        """True when the door never heard of the current bundle (nor runs a newer one)."""
        current = self.current
        if current is None:
            return False
        seq = current.manifest.sequence
        return ack.sequence < seq and (ack.running_sequence or 0) < seq

    def _on_request(self, message: Message) -> None:
        try:
            self._requests.put_nowait(message.payload)
        except queue.Full:
            logger.warning("chunk request queue full; dropping a request (the device will ask again)")

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                raw = self._requests.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self._answer(raw)
            except Exception:
                logger.exception("answering a chunk request failed")

    def _answer(self, raw: bytes) -> None:
        try:
            request = ChunkRequest.parse(raw)
        except PayloadError as exc:
            logger.warning("ignoring a malformed chunk request: %s", exc)
            return
        bundle = self.bundle(request.sequence)
        if bundle is None:
            logger.warning("device %s asked for chunks of bundle %d, which is not in %s", request.device,
                           request.sequence, self.root)
            return
        manifest = bundle.manifest
        topic = self.topics.bundle_chunk_reply(request.device)
        sent = 0
        for ref in request.chunks:
            if ref.file_index >= len(manifest.files) or ref.index >= manifest.chunk_count(ref.file_index):
                continue
            data = read_chunk(bundle, ref.file_index, ref.index)
            total = manifest.chunk_count(ref.file_index)
            frame = make_chunk(manifest.sequence, ref.file_index, ref.index, total, data,
                               correlation_id=request.correlation_id)
            self.client.publish(topic, frame, qos=1)
            sent += 1
        self.served_requests += 1
        logger.debug("sent %d chunks of bundle %d to %s (%s)", sent, manifest.sequence, request.device,
                     request.correlation_id)
