"""The door screen: what the person at the door sees (preview, prompts, result, door and broker state).

``device.kiosk.screen`` turns the agent's decisions, frames and status into the screen's model (``GET
/kiosk/state``); ``device.kiosk.preview`` makes the downscaled MJPEG preview with face boxes;
``device.kiosk.server`` serves both and the page on loopback. Only ``config`` is imported here, so
``device.config`` can hold ``KioskConfig`` without an import cycle.
"""

from device.kiosk.config import KioskConfig

__all__ = ["KioskConfig"]
