"""The ``facegate`` command: a root group whose sub-groups are imported only when used.

Lazy loading keeps ``facegate --help`` and the device commands free of TensorFlow,
FastAPI and dlib; a group whose package (extra) is not installed says which extra to add.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import click

from facegate import __version__
from facegate.logs import LEVELS, setup_logging


@dataclass(frozen=True, slots=True)
class GroupSpec:
    """Where a sub-group lives and which extra it needs."""

    help: str
    targets: tuple[str, ...]  # "module:attribute" of click groups merged into one
    extra: str


GROUPS: dict[str, GroupSpec] = {
    "models": GroupSpec(
        "Build, list, promote and roll back models.",
        ("models.cli:cli", "server.registry.models_cli:cli"),
        "server",
    ),
    "eval": GroupSpec(
        "Evaluate verification, calibrate thresholds, measure liveness.",
        ("server.evaluation.cli:cli", "server.evaluation.calibrate:calibrate",
         "server.evaluation.liveness:liveness", "server.evaluation.liveness_planar:liveness_planar",
         "server.evaluation.liveness_calibrate:liveness_calibrate"),
        "server",
    ),
    "bench": GroupSpec(
        "Benchmarks that print ratios against a baseline.",
        ("bench.cli:cli", "bench.gallery:gallery", "bench.rollout:rollout", "bench.liveness:liveness",
         "bench.style:style", "bench.audit:audit", "bench.door:door", "bench.kiosk:kiosk",
         "bench.frame:frame"),
        "server",
    ),
    "device": GroupSpec("Run and manage the door kiosk agent.", ("device.cli:cli",), "device"),
    "server": GroupSpec("Run the companion server.", ("server.cli:cli", "server.bridge:bridge_config"),
                        "server"),
    "bundle": GroupSpec("Build, publish and track signed bundles.", ("server.bundles.cli:cli",), "server"),
    "keys": GroupSpec("Manage the Ed25519 bundle-signing keys.", ("server.bundles.cli:keys",), "server"),
    "train": GroupSpec("Train embedders and the pairs head.", ("server.training.cli:cli",), "server"),
    "style": GroupSpec("Neural style transfer (Gatys et al.).", ("server.style.cli:cli",), "server"),
    "demo": GroupSpec("Run the whole system end to end.", ("demo:cli",), "server"),
    "doctor": GroupSpec("Check a device or server installation.", ("device.doctor:cli",), "device"),
}


def _load_target(target: str) -> click.Command | None:
    """Import ``module:attr``; None when the module does not exist (not built yet / extra missing)."""
    module_name, attr = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        top = module_name.split(".")[0]
        if exc.name is not None and (exc.name == module_name or module_name.startswith(exc.name + ".")):
            return None
        if exc.name is not None and exc.name.split(".")[0] not in {top}:
            raise click.ClickException(
                f"'{module_name}' needs the Python package '{exc.name}': "
                f"pip install 'facegate[{_extra_for(target)}]'"
            ) from exc
        return None
    command = getattr(module, attr, None)
    return command if isinstance(command, click.Command) else None


def _extra_for(target: str) -> str:
    for spec in GROUPS.values():
        if target in spec.targets:
            return spec.extra
    return "server"


def _unavailable(name: str, spec: GroupSpec) -> click.Command:
    """A stand-in that explains why a group cannot run here."""

    def explain() -> None:
        raise click.ClickException(
            f"'facegate {name}' is not available in this installation: "
            f"pip install 'facegate[{spec.extra}]'"
        )

    return click.Command(name, help=spec.help, callback=explain,
                         context_settings={"ignore_unknown_options": True, "allow_extra_args": True})


class LazyRoot(click.Group):
    """Root group that resolves sub-groups on demand."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        """List every known group; unbuilt ones are hidden by ``get_command``."""
        return sorted(GROUPS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """Import the group's modules and merge their commands."""
        spec = GROUPS.get(cmd_name)
        if spec is None:
            return None
        commands = [c for c in (_load_target(t) for t in spec.targets) if c is not None]
        if not commands:
            return _unavailable(cmd_name, spec)
        if len(commands) == 1:
            return commands[0]
        merged = click.Group(name=cmd_name, help=spec.help)
        for command in commands:
            if isinstance(command, click.Group):
                for name, sub in command.commands.items():
                    merged.add_command(sub, name)
            else:
                merged.add_command(command)
        return merged

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """Show the static help of each group without importing heavy packages."""
        rows = [(name, GROUPS[name].help) for name in sorted(GROUPS)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyRoot, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="facegate")
@click.option("--log-level", type=click.Choice(LEVELS, case_sensitive=False), default="INFO",
              show_default=True, help="Root log level.")
@click.option("--json-logs", is_flag=True, help="Write logs as JSON lines.")
def main(log_level: str, json_logs: bool) -> None:
    """facegate: edge-first face-recognition access control."""
    setup_logging(log_level, json_logs)
