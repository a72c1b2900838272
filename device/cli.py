"""``facegate device ...``: run the kiosk agent, enroll locally, validate its config, unlock remotely."""

from __future__ import annotations

import getpass
import json
import sys
from pathlib import Path

import click

from device.config import config_warnings, load_device_config
from facegate.configio import ConfigError, report_validation

cli = click.Group("device", help="Run and manage the door kiosk agent.")


@cli.command("run")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help="Device config TOML (see deploy/device.example.toml).")
@click.option("--validate-config", is_flag=True, help="Only validate the config; exit 0 or 1.")
def run(config_path: Path | None, validate_config: bool) -> None:
    """Run the door agent until SIGTERM/SIGINT."""
    if validate_config:
        code = report_validation(load_device_config, config_path)
        if code == 0:
            for warning in config_warnings(load_device_config(config_path)):
                click.echo(f"warning: {warning}", err=True)
        sys.exit(code)
    try:
        config = load_device_config(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    from device.agent.compose import run_door

    sys.exit(run_door(config))


@cli.command("enroll")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help="Device config TOML (gallery goes to <data_dir>/gallery).")
@click.option("--person-id", required=True, help="Stable person id (A-Z a-z 0-9 _ . @ : -).")
@click.option("--name", required=True, help="Display name.")
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
def enroll_cmd(config_path: Path | None, person_id: str, name: str, images: tuple[Path, ...]) -> None:
    """Standalone enrollment: quality-gate IMAGES and add the accepted ones to the local gallery.

    Prints one JSON object per image (accepted, failed gates with measured value and limit);
    exits 1 when no image was accepted.
    """
    try:
        config = load_device_config(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    from device.agent.runner import open_gallery, open_pipeline
    from device.enroll import EnrollmentError, enroll, validate_person
    from device.gallery import GalleryError
    from models.runtime.interpreter import ModelLoadError
    from models.runtime.manifest import ManifestError

    try:
        validate_person(person_id, name)
    except EnrollmentError as exc:
        raise click.BadParameter(str(exc)) from exc
    try:
        with open_pipeline(config) as pipeline, open_gallery(config, pipeline) as gallery:
            outcomes = enroll(config, pipeline, gallery, person_id, name, list(images))
    except (GalleryError, ManifestError, ModelLoadError) as exc:
        raise click.ClickException(str(exc)) from exc
    for outcome in outcomes:
        click.echo(json.dumps(outcome.as_dict()))
    if not any(o.accepted for o in outcomes):
        sys.exit(1)


# How long `facegate device unlock` waits for the device's answer by default.
UNLOCK_TIMEOUT_S = 10.0


@cli.command("unlock")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help="The door's config TOML ([device] id and site, [mqtt] broker).")
@click.option("--seconds", type=click.FloatRange(min=0, min_open=True, max=600), default=None,
              help="How long to open (default: the door's unlock_seconds).")
@click.option("--requested-by", default=None, help="Who asks, for the event (default: cli:<user>).")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0.1, max=300), default=UNLOCK_TIMEOUT_S,
              show_default=True, help="Seconds to wait for the door's answer.")
def unlock_cmd(config_path: Path | None, seconds: float | None, requested_by: str | None,
               timeout_s: float) -> None:
    """Open the door now through its MQTT command (on record as a manual_unlock event); print the answer."""
    try:
        config = load_device_config(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    from device.mqtt.command import CommandFailed, send_unlock

    who = requested_by or f"cli:{getpass.getuser()}"
    try:
        response = send_unlock(config, seconds, who, timeout_s)
    except CommandFailed as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(response.to_bytes().decode("utf-8"))
    if not response.ok:
        sys.exit(1)
