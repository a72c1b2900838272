"""The README's MQTT payload examples are valid instances of the schemas they claim to show."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from device.protocol import schemas

README = Path(__file__).resolve().parents[1] / "README.md"
EXAMPLE = re.compile(r"<!-- schema: (\w+) -->\n```json\n(.*?)```", re.DOTALL)


def _examples() -> list[tuple[str, str]]:
    return EXAMPLE.findall(README.read_text(encoding="utf-8"))


def test_readme_documents_every_payload() -> None:
    shown = {name for name, _ in _examples()}
    expected = {"EventPayload", "EventConfirm", "StatusPayload", "CommandRequest", "CommandResponse",
                "BundleAnnounce", "ChunkRequest", "BundleAck", "GalleryDelta"}
    assert expected <= shown, f"README lacks examples for {sorted(expected - shown)}"


@pytest.mark.parametrize(("name", "body"), _examples(), ids=lambda v: v if v.isidentifier() else "")
def test_readme_example_validates(name: str, body: str) -> None:
    model = getattr(schemas, name)
    parsed = model.parse(body)
    assert parsed.schema_version == 1
