"""Publish a bundle (retained announcement, then every chunk at QoS 1) and answer chunk requests.

Requests arrive on ``…/bundles/request`` from devices that missed chunks (late joiners, restarts,
broker restarts); the chunks go back on the requesting device's own ``…/<device>/bundle/chunk`` topic
with the request's correlation id. A worker thread does the file reads, never paho's network thread.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from device.mqtt.client import Message, MqttClient, PublishHandle
from device.protocol.chunks import make_chunk
from device.protocol.schemas import BundleAnnounce, ChunkRequest, PayloadError
from device.protocol.topics import Topics
from server.bundles.builder import BuiltBundle, BundleBuildError, iter_chunks, load_bundle, read_chunk

logger = logging.getLogger(__name__)

# Pending chunk requests; beyond this, requests are dropped (the device asks again after a timeout).
REQUEST_QUEUE_MAX = 1024
# How long publish(wait=True) waits for the broker to acknowledge every chunk.
PUBLISH_WAIT_S = 600.0


class BundleServer:
    """Serves the bundles under ``root`` (``root/<seq>/bundle.json``); a context manager."""

    def __init__(self, client: MqttClient, topics: Topics, root: Path) -> None:
        self.client = client
        self.topics = topics
        self.root = Path(root)
        self.served_requests = 0
        self._cache: dict[int, BuiltBundle] = {}
        self._requests: queue.Queue[bytes] = queue.Queue(maxsize=REQUEST_QUEUE_MAX)
        self._stop = threading.Event()
        self._unsubscribe: Callable[[], None] | None = None
        self._thread = threading.Thread(target=self._run, name="bundle-server", daemon=True)

    def start(self) -> BundleServer:
        """Subscribe to chunk requests and start answering them."""
        self._unsubscribe = self.client.subscribe(self.topics.bundle_chunk_request, self._on_request)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop answering (safe to call twice)."""
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
        """Publish the retained announcement and (by default) every chunk; return the chunk count."""
        self._cache[bundle.manifest.sequence] = bundle
        announce = self.publish_announce(bundle.announce)
        handles: list[PublishHandle] = [announce]
        count = 0
        if chunks:
            topic = self.topics.bundle_chunk(bundle.manifest.sequence)
            for file_index, index, total, data in iter_chunks(bundle):
                frame = make_chunk(bundle.manifest.sequence, file_index, index, total, data)
                handles.append(self.client.publish(topic, frame, qos=1))
                count += 1
        if wait:
            for handle in handles:
                handle.wait_for_publish(PUBLISH_WAIT_S)
        logger.info("bundle %d published: announcement and %d chunks", bundle.manifest.sequence, count)
        return count

    def publish_announce(self, announce: BundleAnnounce) -> PublishHandle:
        """Publish (retained, QoS 1) an announcement as is."""
        return self.client.publish(self.topics.bundle_announce, announce.to_bytes(), qos=1, retain=True)

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
