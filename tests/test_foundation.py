"""The foundation contract: CLI groups, --validate-config, a device that imports without heavy packages."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from device.config import DeviceConfig, load_device_config
from facegate.cli import GROUPS, main
from facegate.configio import ConfigError

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "deploy" / "device.example.toml"


def test_help_lists_every_group() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0, result.output
    for group in ("models", "eval", "bench", "device", "server", "bundle", "train", "style", "demo"):
        assert group in result.output
        assert group in GROUPS


@pytest.mark.parametrize("target", sorted({t for spec in GROUPS.values() for t in spec.targets}))
def test_every_registered_command_exists(target: str) -> None:
    """Each ``module:attr`` the CLI registry names imports and is a click command (with all extras)."""
    module_name, attr = target.split(":")
    command = getattr(importlib.import_module(module_name), attr, None)
    assert isinstance(command, click.Command), f"{target} is not a click command"
    assert CliRunner().invoke(command, ["--help"]).exit_code == 0


def test_device_example_config_validates() -> None:
    result = CliRunner().invoke(main, ["device", "run", "--validate-config", "--config", str(EXAMPLE)])
    assert result.exit_code == 0, result.output
    assert "config OK" in result.output


@pytest.mark.parametrize(
    ("extra_toml", "field"),
    [
        ("[decision]\ntau = 0.5\nbogus = 1\n", "decision.bogus"),
        ("[decision]\ntau = 7.0\n", "decision.tau"),
        ("[detector]\nscore_threshold = -0.1\n", "detector.score_threshold"),
        ("[camera]\ntype = \"warp-drive\"\n", "camera"),
        ("[decision]\nconfirm_k = 5\nconfirm_n = 3\n", "decision"),
    ],
)
def test_bad_config_exits_1_naming_the_field(tmp_path: Path, extra_toml: str, field: str) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(extra_toml)
    result = CliRunner().invoke(main, ["device", "run", "--validate-config", "--config", str(bad)])
    assert result.exit_code == 1
    assert field in result.output


def test_every_error_is_reported_at_once(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[decision]\ntau = 7.0\n[gallery]\ntop_k = 0\n[nonsense]\nx = 1\n")
    with pytest.raises(ConfigError) as info:
        load_device_config(bad)
    joined = "\n".join(info.value.errors)
    for field in ("decision.tau", "gallery.top_k", "nonsense"):
        assert field in joined


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.toml"
    garbage.write_bytes(b"\xff\xfe[[[")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_device_config(garbage)
    with pytest.raises(ConfigError, match="not found"):
        load_device_config(tmp_path / "absent.toml")


def test_env_overrides_secrets() -> None:
    config = load_device_config(EXAMPLE, environ={"FACEGATE_DEVICE__MQTT__PASSWORD": "s3cret",
                                                  "FACEGATE_DEVICE__DECISION__TAU": "0.95"})
    assert config.mqtt.password == "s3cret"
    assert config.decision.tau == pytest.approx(0.95)
    assert isinstance(config, DeviceConfig)


BLOCKER = r"""
import importlib.abc, importlib.util, pkgutil, sys
BLOCKED = {"tensorflow", "keras", "fastapi", "dlib", "server", "sqlalchemy", "torch"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"blocked for the device-only test: {name}", name=name)
        return None
sys.meta_path.insert(0, Block())
import device
names = [m.name for m in pkgutil.walk_packages(device.__path__, "device.")]
for name in names:
    __import__(name)
heavy = sorted(k for k in sys.modules if k.split(".")[0] in BLOCKED)
assert not heavy, heavy
print(f"imported {len(names)} device modules; tensorflow in sys.modules: {'tensorflow' in sys.modules}")
"""


def test_device_imports_without_heavy_packages() -> None:
    """Every device module imports with tensorflow/fastapi/dlib/server made unimportable."""
    proc = subprocess.run([sys.executable, "-c", BLOCKER], capture_output=True, text=True, timeout=300,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tensorflow in sys.modules: False" in proc.stdout


def test_atomic_writes_respect_the_umask_or_the_given_mode(tmp_path: Path) -> None:
    """Models and manifests are readable like any new file; keys and biometric files stay 0600."""
    import stat

    from core.files import _UMASK, atomic_write_bytes

    plain, private = tmp_path / "manifest.json", tmp_path / "chip.key"
    atomic_write_bytes(plain, b"{}")
    atomic_write_bytes(private, b"secret", mode=0o600)
    assert stat.S_IMODE(plain.stat().st_mode) == 0o666 & ~_UMASK
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert plain.read_bytes() == b"{}" and not list(tmp_path.glob(".*"))  # no temp file left behind
