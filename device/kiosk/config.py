"""``[kiosk]``: the door screen the agent serves to Chromium in kiosk mode (``device.kiosk``).

Kept free of ``device.config`` imports so that ``DeviceConfig`` can hold it without an import cycle.
"""

from __future__ import annotations

import ipaddress

from pydantic import BaseModel, ConfigDict, Field

# Host names that only this machine can reach (besides loopback IP addresses).
LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})
# The ceiling for the live preview: enough for a person to see themselves, cheap on a Pi.
MAX_PREVIEW_FPS = 15.0


def is_loopback(host: str) -> bool:
    """True when ``host`` names this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.lower() in LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class KioskConfig(BaseModel):
    """The door screen: live preview, prompts and results, served over HTTP to a local browser.

    It binds to loopback by default: the preview shows camera images, which must not leave the device.
    Any other ``host`` is an explicit choice that ``--validate-config`` and the start log warn about.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(False, description="Serve the kiosk screen (Chromium in kiosk mode shows it).")
    host: str = Field(
        "127.0.0.1", min_length=1, max_length=255,
        description="Address to bind; keep loopback: the preview carries camera images.",
    )
    port: int = Field(8088, ge=0, le=65535, description="Port to bind; 0 picks a free one (tests).")
    show_names: bool = Field(
        True, description="Greet a granted person by first name ('Welcome, Ada'); false shows 'Welcome'.",
    )
    preview: bool = Field(True, description="Show the live camera preview with face boxes.")
    preview_fps: float = Field(
        10.0, gt=0, le=MAX_PREVIEW_FPS, description="Most preview frames per second sent to each screen.",
    )
    preview_width: int = Field(
        480, ge=160, le=1280, description="Preview width in pixels (frames are downscaled, never up).",
    )
    jpeg_quality: int = Field(70, ge=30, le=95, description="JPEG quality of the preview frames.")
    result_hold_s: float = Field(
        4.0, gt=0, le=60, description="How long a result (welcome, denied, not recognised) stays on screen.",
    )
    dark_level: float = Field(
        50.0, ge=0, le=255,
        description="Mean brightness (0-255) of the face below which the screen asks for more light.",
    )
    max_clients: int = Field(4, ge=1, le=32, description="Preview streams served at once (CPU bound).")

    @property
    def loopback(self) -> bool:
        """Whether the screen is reachable from this machine only."""
        return is_loopback(self.host)
