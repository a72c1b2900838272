"""The door's X25519 key pair and the gallery keys unwrapped with it.

Layout under the bundle store (``<data_dir>/bundles``), both files mode 0600:

    door.key            the door's X25519 private key (raw 32 bytes), made here on first start; it
                        never leaves the door (only the public half goes out, in the bundle ack)
    gallery_keys.json   {version: base64 gallery key}: every gallery key version a signed bundle or
                        delta wrapped to this door

A wrap is only looked at after the signature of the payload carrying it verified, and a wrap for
another door or another version does not open (the door id and version are its associated data).
"""

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from core.files import atomic_write_bytes
from core.gallerycrypto import (
    GALLERY_KEY_BYTES,
    X25519_KEY_BYTES,
    GalleryCryptoError,
    b64,
    public_bytes,
    unb64,
    unwrap,
)
from core.protocol.schemas import KeyWrap

logger = logging.getLogger(__name__)

DOOR_KEY_FILE = "door.key"
GALLERY_KEYS_FILE = "gallery_keys.json"
PRIVATE_MODE = 0o600


class DoorKeyError(Exception):
    """The door key file is unreadable or malformed (the door cannot open sealed galleries)."""


class DoorKeys:
    """One door's private key and the gallery keys it has unwrapped."""

    def __init__(self, root: Path, device_id: str) -> None:
        self.root = Path(root)
        self.device_id = device_id
        self.root.mkdir(parents=True, exist_ok=True)
        self._private = self._load_or_create(self.root / DOOR_KEY_FILE)
        self._keys: dict[int, bytes] = self._load_keys(self.root / GALLERY_KEYS_FILE)

    @staticmethod
    def _load_or_create(path: Path) -> X25519PrivateKey:
        if not path.exists():
            key = X25519PrivateKey.generate()
            raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                    serialization.NoEncryption())
            atomic_write_bytes(path, raw, mode=PRIVATE_MODE)
            logger.info("generated this door's X25519 key %s", path)
            return key
        try:
            raw = path.read_bytes()
            mode = path.stat().st_mode
        except OSError as exc:
            raise DoorKeyError(f"cannot read the door key {path}: {exc}") from exc
        if len(raw) != X25519_KEY_BYTES:
            raise DoorKeyError(f"door key {path} must hold {X25519_KEY_BYTES} raw bytes, has {len(raw)}; "
                               "remove it to make a new one (then approve the new key on the server)")
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            logger.warning("door key %s is readable by other users (mode %o); fixing it to 600", path,
                           mode & 0o777)
            os.chmod(path, PRIVATE_MODE)
        return X25519PrivateKey.from_private_bytes(raw)

    @staticmethod
    def _load_keys(path: Path) -> dict[int, bytes]:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            keys = {int(v): unb64(str(k), "stored gallery key") for v, k in dict(data).items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError, GalleryCryptoError) as exc:
            logger.error("stored gallery keys %s are unreadable (%s); waiting for the next wraps", path, exc)
            return {}
        return {v: k for v, k in keys.items() if len(k) == GALLERY_KEY_BYTES}

    @property
    def public_b64(self) -> str:
        """This door's public key, base64 of its raw 32 bytes: what the bundle ack reports."""
        return b64(public_bytes(self._private.public_key()))

    @property
    def versions(self) -> list[int]:
        """Gallery key versions this door holds."""
        return sorted(self._keys)

    def learn(self, wraps: Iterable[KeyWrap]) -> list[int]:
        """Unwrap every new wrap addressed to this door (from a verified payload); return new versions."""
        new: list[int] = []
        for item in wraps:
            if item.device != self.device_id or item.version in self._keys:
                continue
            try:
                self._keys[item.version] = unwrap(self._private, item.epk, item.sealed, self.device_id,
                                                  item.version)
            except GalleryCryptoError as exc:
                logger.error("gallery key %d wrap for this door does not open: %s", item.version, exc)
                continue
            new.append(item.version)
        if new:
            text = json.dumps({str(v): b64(k) for v, k in sorted(self._keys.items())})
            atomic_write_bytes(self.root / GALLERY_KEYS_FILE, text.encode("utf-8"), mode=PRIVATE_MODE)
            logger.info("learned gallery key version(s) %s", new)
        return new

    def key(self, version: int) -> bytes | None:
        """Gallery key ``version``, or None when no wrap for this door ever carried it."""
        return self._keys.get(version)
