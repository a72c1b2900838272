"""``facegate bundle build|publish|status`` and ``facegate keys generate|show``."""

from __future__ import annotations

import json
import logging
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from core.mqtt.client import ClientSettings, MqttClient, settings_from
from core.protocol.topics import Topics
from facegate.configio import ConfigError
from server.config import ServerConfig, load_server_config

if TYPE_CHECKING:
    from server.bundles.sitekeys import SiteKeyring

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
KEY_FILE = Path("keys") / "bundle.key"
# Retained acks arrive right after subscribing; this is how long `status` listens by default.
STATUS_LISTEN_S = 2.0
CONNECT_TIMEOUT_S = 10.0

cli = click.Group("bundle", help="Build, publish and track signed model+gallery bundles.")
keys = click.Group("keys", help="Manage the Ed25519 bundle-signing key.")


def _config(path: Path | None) -> ServerConfig:
    try:
        return load_server_config(path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc


def _config_option(func: F) -> F:
    return click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
                        help="Server config TOML (data_dir, [mqtt]).")(func)


def _mqtt_options(func: F) -> F:
    for option in reversed([
        click.option("--host", default=None, help="Broker host (default: [mqtt] host)."),
        click.option("--port", type=click.IntRange(1, 65535), default=None, help="Broker port."),
        click.option("--prefix", default=None, help="Topic prefix (default: [mqtt] prefix)."),
        click.option("--site", default=None, help="Site id (default: [mqtt] site)."),
    ]):
        func = option(func)
    return func


@dataclass(frozen=True, slots=True)
class _Broker:
    settings: ClientSettings
    topics: Topics


def _broker(config: ServerConfig, host: str | None, port: int | None, prefix: str | None,
            site: str | None) -> _Broker:
    m = config.mqtt
    settings = settings_from(m, f"facegate-bundle-{uuid.uuid4().hex[:8]}", host=host, port=port)
    return _Broker(settings, Topics(prefix or m.prefix, site or m.site))


def _connect(broker: _Broker) -> MqttClient:
    client = MqttClient(broker.settings).start()
    if not client.wait_connected(CONNECT_TIMEOUT_S):
        client.close()
        raise click.ClickException(f"no broker at {broker.settings.host}:{broker.settings.port}")
    return client


# ----------------------------------------------------------------------------- keys


@keys.command("generate")
@_config_option
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Private key file (default: <data_dir>/keys/bundle.key).")
@click.option("--force", is_flag=True, help="Replace an existing key (devices must pin the new one).")
def keys_generate(config_path: Path | None, out: Path | None, force: bool) -> None:
    """Create the signing key (mode 0600) and print the public key (base64) for device configs."""
    from server.bundles.signing import SigningKeyError, generate_key, public_key_b64

    path = out or _config(config_path).signing_key_path
    try:
        key = generate_key(path, force=force)
    except SigningKeyError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"private key: {path} (mode 600); public key also in {path}.pub", err=True)
    click.echo("pin it on each device: [bundle] public_key = \"<the line below>\"", err=True)
    click.echo(public_key_b64(key))


@keys.command("show")
@_config_option
@click.option("--key", "key_path", type=click.Path(path_type=Path), default=None, help="Private key file.")
def keys_show(config_path: Path | None, key_path: Path | None) -> None:
    """Print the public key (base64) of the signing key."""
    from server.bundles.signing import SigningKeyError, load_private_key, public_key_b64

    try:
        key = load_private_key(key_path or _config(config_path).signing_key_path)
    except SigningKeyError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(public_key_b64(key))


# ----------------------------------------------------------------------------- bundle


@cli.command("build")
@_config_option
@click.option("--models", "models_dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Folder with the models' manifest.json (default: the built models).")
@click.option("--gallery", "gallery_dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Gallery folder (gallery.json) embedded with one of those embedders; default: export "
                   "every enrolled person from the server database (chip key needed).")
@click.option("--out", "out_root", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Bundles folder (default: <data_dir>/bundles).")
@click.option("--key", "key_path", type=click.Path(path_type=Path), default=None, help="Signing key file.")
@click.option("--sequence", type=click.IntRange(min=1), default=None, help="Force a sequence number.")
@click.option("--chunk-kb", type=click.IntRange(1, 65536), default=256, show_default=True,
              help="Chunk size on the wire.")
@click.option("--embedder", default=None, help="Embedder name in the manifest (default: the gallery's).")
@click.option("--plaintext", is_flag=True,
              help="UNSAFE: with --gallery, do not seal the gallery (only for doors with "
                   "bundle.require_sealed_gallery = false); by default it is sealed to the site's doors.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def build(config_path: Path | None, models_dir: Path | None, gallery_dir: Path | None, out_root: Path | None,
          key_path: Path | None, sequence: int | None, chunk_kb: int, embedder: str | None, plaintext: bool,
          as_json: bool) -> None:
    """Build and sign a bundle from a models folder and a gallery (default: the server's enrolled persons)."""
    from models.runtime.assets import default_models_dir
    from server.bundles.builder import BundleBuildError, build_bundle
    from server.bundles.signing import SigningKeyError, load_private_key
    from server.bundles.sitekeys import SiteKeyError

    config = _config(config_path)
    if gallery_dir is None:
        if embedder is not None:
            raise click.UsageError("--embedder goes with --gallery; without it the server's [models] "
                                   "embedder is used")
        result = _build_from_database(config, models_dir, key_path, out_root, sequence, chunk_kb * 1024)
    else:
        if plaintext:
            logger.warning("UNSAFE: building bundle with a plaintext gallery (--plaintext)")
        try:
            sealer = None if plaintext else _keyring(config).sealer()
            key = load_private_key(key_path or config.signing_key_path)
            built = build_bundle(models_dir or config.models.dir or default_models_dir(), gallery_dir,
                                 out_root or config.bundles_root, key, sequence=sequence,
                                 chunk_size=chunk_kb * 1024, embedder=embedder, sealer=sealer)
        except (BundleBuildError, SigningKeyError, SiteKeyError) as exc:
            raise click.ClickException(str(exc)) from exc
        m = built.manifest
        result = {"sequence": m.sequence, "path": str(built.path), "files": len(m.files),
                  "bytes": m.total_size, "chunks": m.total_chunks, "model_version": m.model_version,
                  "gallery_version": m.gallery_version, "gallery_key_version": m.gallery_key_version,
                  "wrapped_to": sorted({w.device for w in m.keys})}
    click.echo(json.dumps(result) if as_json else
               f"bundle {result['sequence']}: {result['path']} ({result['files']} files, "
               f"{result['bytes'] / 1e6:.1f} MB, {result['chunks']} chunks)")


def _build_from_database(config: ServerConfig, models_dir: Path | None, key_path: Path | None,
                         out_root: Path | None, sequence: int | None, chunk_size: int) -> dict[str, Any]:
    """Export the enrolled gallery for the active embedder and build a signed bundle from it."""
    from models.runtime.assets import default_models_dir
    from models.runtime.manifest import ManifestError
    from server.bundles.builder import BundleBuildError
    from server.bundles.gallery_bundle import build_gallery_bundle
    from server.bundles.gallery_export import GalleryExportError
    from server.bundles.signing import SigningKeyError
    from server.bundles.sitekeys import SiteKeyError
    from server.cli import open_database
    from server.crypto import CryptoError
    from server.registry.model_folder import active_models_dir
    from server.registry.promotion import PromotionContext

    with open_database(config) as db:
        folder = models_dir or active_models_dir(config, db) or config.models.dir or default_models_dir()
        try:
            return build_gallery_bundle(PromotionContext(config, db), folder, key_path=key_path,
                                        out_root=out_root, sequence=sequence, chunk_size=chunk_size)
        except (BundleBuildError, SigningKeyError, GalleryExportError, CryptoError, ManifestError,
                SiteKeyError) as exc:
            raise click.ClickException(str(exc)) from exc


@cli.command("publish")
@_config_option
@_mqtt_options
@click.argument("bundle_dir", type=click.Path(path_type=Path, file_okay=False), required=False)
@click.option("--root", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Bundles folder (default: <data_dir>/bundles); without BUNDLE_DIR: its newest.")
@click.option("--serve", "serve_s", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Keep answering chunk requests for this many seconds.")
@click.option("--until-installed", type=click.IntRange(min=1), default=None,
              help="While serving, stop early once this many devices run the bundle.")
def publish(config_path: Path | None, host: str | None, port: int | None, prefix: str | None,
            site: str | None, bundle_dir: Path | None, root: Path | None, serve_s: float,
            until_installed: int | None) -> None:
    """Publish a bundle: retained signed announcement, then every chunk (QoS 1)."""
    from server.bundles.builder import BundleBuildError, load_bundle, next_sequence
    from server.bundles.publisher import BundleServer
    from server.bundles.rollout import RolloutTracker, installed

    config = _config(config_path)
    root = root or config.data_dir / "bundles"
    try:
        bundle = load_bundle(bundle_dir or root / str(next_sequence(root) - 1))
    except BundleBuildError as exc:
        raise click.ClickException(str(exc)) from exc
    broker = _broker(config, host, port, prefix, site)
    client = _connect(broker)
    seq = bundle.manifest.sequence
    try:
        with BundleServer(client, broker.topics, bundle.path.parent) as server, \
                RolloutTracker(client, broker.topics) as tracker:
            count = server.publish(bundle, wait=True)
            click.echo(f"bundle {seq}: announced, {count} chunks published", err=True)
            if serve_s > 0:
                target = until_installed or sys.maxsize
                tracker.wait(lambda devices: len(installed(devices, seq)) >= target, serve_s)
                click.echo(f"{len(installed(tracker.snapshot(), seq))} devices run bundle {seq}", err=True)
    finally:
        client.close()


# ----------------------------------------------------------------------------- door keys


def _keyring(config: ServerConfig) -> SiteKeyring:
    """The site's gallery keyring under the server's chip key (never creates a chip key here)."""
    from server.crypto import CryptoError, load_chip_cipher
    from server.state import site_keyring

    crypto = config.crypto.model_copy(update={"create_key_file": False})
    try:
        keyring = site_keyring(config, load_chip_cipher(config.model_copy(update={"crypto": crypto})))
    except CryptoError as exc:
        raise click.ClickException(str(exc)) from exc
    if keyring is None:
        raise click.ClickException("[bundles] encrypt_gallery is off: there are no gallery keys")
    return keyring


@cli.command("doors")
@_config_option
def doors_cmd(config_path: Path | None) -> None:
    """Print (JSON) the gallery key version and each door's key state: trusted, revoked, pending key."""
    from server.bundles.sitekeys import SiteKeyError

    keyring = _keyring(_config(config_path))
    try:
        click.echo(json.dumps({"gallery_key_version": keyring.current_version, "doors": keyring.doors()}))
    except SiteKeyError as exc:
        raise click.ClickException(str(exc)) from exc


@cli.command("revoke-door")
@_config_option
@click.argument("device")
def revoke_door_cmd(config_path: Path | None, device: str) -> None:
    """Revoke DEVICE's key and rotate the site's gallery key (JSON: the new version).

    The next delta and bundle are sealed under the new key, wrapped only to the other doors. A running
    server publishes the delta under it at the next change; POST /api/devices/DEVICE/revoke does both at
    once. Revoke the door's broker certificate too (deploy/mosquitto/make-certs.sh revoke DEVICE).
    """
    from server.bundles.sitekeys import SiteKeyError

    keyring = _keyring(_config(config_path))
    try:
        version = keyring.revoke(device)
    except SiteKeyError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps({"device": device, "gallery_key_version": version}))


@cli.command("approve-door")
@_config_option
@click.argument("device")
def approve_door_cmd(config_path: Path | None, device: str) -> None:
    """Trust the public key DEVICE reported last (a re-installed door, or a revoked one re-admitted)."""
    from server.bundles.sitekeys import SiteKeyError

    keyring = _keyring(_config(config_path))
    try:
        keyring.approve(device)
    except SiteKeyError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps({"device": device, "state": keyring.doors()[device]["state"]}))


@cli.command("status")
@_config_option
@_mqtt_options
@click.option("--sequence", type=click.IntRange(min=1), default=None, help="Rollout of this bundle.")
@click.option("--listen", type=click.FloatRange(min=0.1), default=STATUS_LISTEN_S, show_default=True,
              help="Seconds to collect retained acks.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def status(config_path: Path | None, host: str | None, port: int | None, prefix: str | None,
           site: str | None, sequence: int | None, listen: float, as_json: bool) -> None:
    """Show each device's bundle and delta state (from the retained acks)."""
    from server.bundles.rollout import RolloutTracker, summary

    broker = _broker(_config(config_path), host, port, prefix, site)
    client = _connect(broker)
    try:
        with RolloutTracker(client, broker.topics) as tracker:
            time.sleep(listen)
            devices = tracker.snapshot()
    finally:
        client.close()
    rows = [devices[d].as_dict() for d in sorted(devices)]
    counts = summary(devices, sequence)
    if as_json:
        click.echo(json.dumps({"sequence": sequence, "devices": rows, "summary": counts}))
        return
    _print_table(rows, counts)


def _print_table(rows: list[dict[str, Any]], counts: dict[str, int]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="bundle rollout")
    for column in ("device", "available", "running", "bundle", "state", "%", "delta", "reason"):
        table.add_column(column)
    for r in rows:
        delta = f"{r['delta_sequence']} {r['delta_state'] or ''}".strip() if r["delta_sequence"] else ""
        table.add_row(r["device"], r["available"] or "?", str(r["running_sequence"] or "-"),
                      str(r["sequence"] or "-"), r["state"] or "-", f"{r['percent'] or 0:.0f}", delta,
                      (r["reason"] or "")[:60])
    console = Console()
    console.print(table)
    console.print(", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "no devices")
