"""``facegate demo``: broker, server, enrollment, signed bundle and a door on a replay camera, end to end."""

from demo.cli import cli

__all__ = ["cli"]
