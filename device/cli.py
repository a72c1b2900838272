"""``facegate device ...``: run the kiosk agent, enroll locally, validate its config."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from device.config import load_device_config
from facegate.configio import ConfigError, report_validation

cli = click.Group("device", help="Run and manage the door kiosk agent.")


@cli.command("run")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help="Device config TOML (see deploy/device.example.toml).")
@click.option("--validate-config", is_flag=True, help="Only validate the config; exit 0 or 1.")
def run(config_path: Path | None, validate_config: bool) -> None:
    """Run the door agent until SIGTERM/SIGINT."""
    if validate_config:
        sys.exit(report_validation(load_device_config, config_path))
    try:
        config = load_device_config(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    from device.agent.runner import run_agent

    sys.exit(run_agent(config))
