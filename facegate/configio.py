"""Load pydantic configs from TOML with environment overrides, and report every error by field path."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(Exception):
    """A config file could not be read or did not validate; ``errors`` lists 'field.path: message'."""

    def __init__(self, path: Path | None, errors: list[str]) -> None:
        self.path = path
        self.errors = errors
        where = str(path) if path else "<config>"
        super().__init__(f"invalid config {where}:\n" + "\n".join(f"  {e}" for e in errors))


def _set_path(data: dict[str, Any], dotted: list[str], value: str) -> None:
    node = data
    for key in dotted[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            return
        node = child
    node[dotted[-1]] = value


def env_overrides(prefix: str, environ: dict[str, str] | None = None) -> dict[str, Any]:
    """Map ``PREFIX__SECTION__FIELD=value`` to nested keys (for secrets such as passwords and keys)."""
    env = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    marker = prefix.upper() + "__"
    for key, value in env.items():
        if key.startswith(marker):
            _set_path(out, [p.lower() for p in key[len(marker):].split("__") if p], value)
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def format_errors(exc: ValidationError) -> list[str]:
    """Turn a pydantic error into 'a.b.c: message' lines."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        lines.append(f"{loc}: {err['msg']}")
    return lines


def load_config(model: type[M], path: Path | None, env_prefix: str,
                environ: dict[str, str] | None = None) -> M:
    """Read TOML at ``path`` (or defaults when None), apply env overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(path, [f"<file>: not found: {path}"]) from exc
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(path, [f"<file>: not valid TOML: {exc}"]) from exc
    data = _merge(data, env_overrides(env_prefix, environ))
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(path, format_errors(exc)) from exc


def report_validation(load: Any, path: Path | None) -> int:
    """Run ``load(path)`` and print OK or every error with its field path; return the exit code."""
    import click

    try:
        load(path)
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        return 1
    click.echo(f"config OK: {path if path else '<defaults>'}")
    return 0
