"""The import direction of docs/ARCHITECTURE.md, checked on the source: nothing light imports ``server``
or TensorFlow, and ``models.runtime`` stays numpy + LiteRT."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = {"tensorflow", "keras", "fastapi", "dlib", "sqlalchemy", "server"}
# package folder -> top-level modules it must never import (lazily or not)
RULES = {
    "core": HEAVY | {"device", "models", "facegate", "bench", "demo", "faiss", "cv2"},
    "device": HEAVY,
    "models/runtime": HEAVY | {"device", "facegate", "bench", "demo", "models.convert", "faiss",
                               "cv2", "paho"},
    "models/face": HEAVY | {"device", "facegate", "bench", "demo", "models.convert", "faiss", "paho"},
    "facegate": HEAVY,
}
# (a, b): modules under folder a never import b (the reverse direction is the allowed one), so no cycle.
ONE_WAY = [
    ("device/bundles", {"device.mqtt"}),
    ("models", {"device"}),
]


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def _violations(folder: str, banned: set[str]) -> list[str]:
    bad = []
    for path in sorted((REPO / folder).rglob("*.py")):
        for line, module in _imports(path):
            if any(module == b or module.startswith(b + ".") for b in banned):
                bad.append(f"{path.relative_to(REPO)}:{line} imports {module}")
    return bad


@pytest.mark.parametrize("folder", sorted(RULES))
def test_light_packages_do_not_import_heavy_ones(folder: str) -> None:
    assert (REPO / folder).is_dir()
    assert _violations(folder, RULES[folder]) == []



@pytest.mark.parametrize(("folder", "banned"), ONE_WAY)
def test_no_cycles(folder: str, banned: set[str]) -> None:
    assert (REPO / folder).is_dir()
    assert _violations(folder, banned) == []


def test_models_runtime_imports_only_core() -> None:
    first_party = {"core", "device", "server", "models", "facegate", "bench", "demo"}
    bad = [f"{path.relative_to(REPO)}:{line} imports {module}"
           for path in sorted((REPO / "models/runtime").rglob("*.py"))
           for line, module in _imports(path)
           if module.split(".")[0] in first_party and module.split(".")[0] != "core"
           and not module.startswith("models.runtime")]
    assert bad == []
