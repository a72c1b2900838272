"""The site's gallery key and the doors it is wrapped to: trust on first use, admin approval, revocation.

One file, ``<bundles root>/gallery_keys.json`` (mode 0600), shared by the running server and the CLI,
re-read on every use and replaced atomically::

    {"current": 2,
     "versions": {"1": <ChipCipher ciphertext, base64>, "2": ...},    # gallery keys, encrypted at rest
     "doors": {"door-a": {"key": <X25519 public, base64>, "state": "trusted", "pending": null}, ...}}

- A door reports its X25519 public key in every bundle ack (its hello). The first key heard for a
  door id is trusted (trust on first use: the broker's ACL already admits only certified doors to a
  door's ack topic); with ``[bundles] trust_new_doors = false`` a new door waits for an admin's
  approval too. A *different* key later is not trusted: it is kept as ``pending`` until an admin runs
  ``facegate bundle approve-door`` (a re-installed door), so a stolen door id cannot swap keys.
- Revoking a door (``facegate bundle revoke-door``, ``POST /api/devices/{id}/revoke``) marks it revoked
  and makes a new gallery key version; every later bundle and delta is sealed under it and wrapped only
  to the remaining trusted doors. A revoked door's hello is ignored until an admin approves it again.
- The gallery keys are encrypted at rest under the server's chip key, bound to site and version. If the
  chip key was rotated since (``facegate server rotate-chip-key``), the current version is under the
  retired key and a new version is made: the doors get it with the next delta. A key entry that does
  not authenticate (tampered, or moved from another site) stops sealing with an error instead.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.files import atomic_write_bytes, exclusive_lock
from core.gallerycrypto import (
    GALLERY_KEY_BYTES,
    GalleryCryptoError,
    b64,
    load_public,
    new_gallery_key,
    unb64,
    wrap,
)
from core.protocol.schemas import KeyWrap
from server.crypto import KEY_ID_BYTES, ChipCipher, CryptoError

logger = logging.getLogger(__name__)

KEYRING_FILE = "gallery_keys.json"
KEYRING_MODE = 0o600
# Key versions wrapped in each bundle and delta: the current one plus older ones a door may still need for
# a bundle built before the last revocation. More costs a wrap per door per version in every delta.
WRAPPED_VERSIONS = 4


class DoorKeyState(enum.StrEnum):
    """Where a door's key stands."""

    TRUSTED = "trusted"
    NEW = "new"  # heard of, waiting for an admin's approval ([bundles] trust_new_doors = false)
    REVOKED = "revoked"


class SiteKeyError(Exception):
    """The keyring file is unreadable, or an admin action names an unknown door."""


@dataclass(frozen=True, slots=True)
class GallerySealer:
    """What a bundle or delta is sealed with: the current gallery key and its wraps to the site's doors."""

    version: int
    key: bytes
    keys: list[KeyWrap]


class SiteKeyring:
    """The gallery keys of one site and the doors' public keys (see the module docstring)."""

    def __init__(self, root: Path, cipher: ChipCipher, site: str, *, trust_new_doors: bool = True) -> None:
        self.path = Path(root) / KEYRING_FILE
        self.cipher = cipher
        self.site = site
        self.trust_new_doors = trust_new_doors
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ file

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """This process's threads, then other processes (server replicas, the CLI), one at a time."""
        with self._lock, exclusive_lock(self.path.with_suffix(".lock")):
            yield

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise TypeError("not an object")
            data.setdefault("current", 0)
            data.setdefault("versions", {})
            data.setdefault("doors", {})
        except FileNotFoundError:
            return {"site": self.site, "current": 0, "versions": {}, "doors": {}}
        except (OSError, ValueError, TypeError) as exc:
            raise SiteKeyError(f"gallery keyring {self.path} is unreadable: {exc}") from exc
        if data.get("site", self.site) != self.site:
            raise SiteKeyError(f"gallery keyring {self.path} belongs to site {data.get('site')!r}, but this "
                               f"config's [mqtt] site is {self.site!r}: use that site's config")
        data["site"] = self.site
        return data

    def _write(self, data: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path, json.dumps(data, indent=1, sort_keys=True).encode("utf-8"),
                           mode=KEYRING_MODE)

    def _associated(self, version: int) -> str:
        return f"facegate-site-gallery-key|{self.site}|{version}"

    def _new_version(self, data: dict[str, Any], why: str) -> int:
        version = int(data["current"]) + 1
        sealed = self.cipher.encrypt(new_gallery_key(), self._associated(version))
        data["versions"][str(version)] = b64(sealed)
        data["current"] = version
        logger.warning("site %s: gallery key version %d made (%s)", self.site, version, why)
        return version

    def _key(self, data: dict[str, Any], version: int) -> bytes | None:
        text = data["versions"].get(str(version))
        if text is None:
            return None
        try:
            blob = unb64(text, "stored gallery key")
        except GalleryCryptoError as exc:
            raise SiteKeyError(f"gallery key {version} in {self.path} is damaged: {exc}") from exc
        if blob[1 : 1 + KEY_ID_BYTES] != self.cipher.key_id:
            # Sealed under an earlier chip key (rotated since): the doors hold it; a new version follows.
            logger.warning("site %s: gallery key %d is under a retired chip key", self.site, version)
            return None
        try:
            key = self.cipher.decrypt(blob, self._associated(version), "gallery key")
        except CryptoError as exc:  # tampered or moved: fail closed, never rotate silently
            raise SiteKeyError(f"gallery key {version} in {self.path} does not open: {exc}") from exc
        if len(key) != GALLERY_KEY_BYTES:
            raise SiteKeyError(f"gallery key {version} in {self.path} has the wrong length")
        return key

    # ------------------------------------------------------------------ sealing

    def sealer(self) -> GallerySealer:
        """The current gallery key (made on first use) and its wraps to every trusted door."""
        with self._locked():
            data = self._read()
            current = int(data["current"])
            key = self._key(data, current) if current else None
            if key is None:
                self._new_version(data, "first use" if not current else "the chip key was rotated")
                self._write(data)
                current = int(data["current"])
                key = self._key(data, current)
                if key is None:
                    raise SiteKeyError("a new gallery key does not open under the chip key")
            return GallerySealer(current, key, self._wraps(data))

    def _wraps(self, data: dict[str, Any]) -> list[KeyWrap]:
        current = int(data["current"])
        versions = [v for v in range(max(1, current - WRAPPED_VERSIONS + 1), current + 1)]
        keys = {v: k for v in versions if (k := self._key(data, v)) is not None}
        wraps: list[KeyWrap] = []
        for device, door in sorted(data["doors"].items()):
            if door.get("state") != DoorKeyState.TRUSTED:
                continue
            try:
                public = load_public(str(door["key"]))
            except (GalleryCryptoError, KeyError, ValueError) as exc:
                logger.error("door %s: stored public key unusable (%s); it gets no gallery key", device, exc)
                continue
            for version, key in keys.items():
                epk, sealed = wrap(key, public, device, version)
                wraps.append(KeyWrap(device=device, version=version, epk=epk, sealed=sealed))
        return wraps

    def key(self, version: int) -> bytes | None:
        """Gallery key ``version`` (None when unknown or no longer opening): for audits of sealed bundles."""
        with self._locked():
            return self._key(self._read(), version)

    # ------------------------------------------------------------------ doors

    def observe(self, device: str, public_key: str) -> bool:
        """Record a door's reported key; True when a new door became trusted (its wraps are new)."""
        try:
            load_public(public_key)
        except GalleryCryptoError as exc:
            logger.warning("door %s reported an unusable public key: %s", device, exc)
            return False
        with self._locked():
            data = self._read()
            door = data["doors"].get(device)
            if door is None and not self.trust_new_doors:
                data["doors"][device] = {"key": "", "state": DoorKeyState.NEW, "pending": public_key}
                self._write(data)
                logger.warning("new door %s reported a key; it gets no gallery key until an admin runs "
                               "`facegate bundle approve-door %s`", device, device)
                return False
            if door is None:
                data["doors"][device] = {"key": public_key, "state": DoorKeyState.TRUSTED, "pending": None}
                self._write(data)
                logger.info("door %s: public key trusted on first use", device)
                return True
            if door["key"] == public_key or door.get("pending") == public_key:
                return False
            door["pending"] = public_key
            self._write(data)
            if door.get("state") == DoorKeyState.REVOKED:
                logger.warning("revoked door %s reported a key; it gets no gallery key unless approved",
                               device)
            else:
                logger.warning("door %s reported a different public key; it keeps the old one until an admin "
                               "runs `facegate bundle approve-door %s`", device, device)
            return False

    def approve(self, device: str) -> None:
        """Trust the key a door reported last (a re-installed or re-admitted door)."""
        with self._locked():
            data = self._read()
            door = data["doors"].get(device)
            if door is None:
                raise SiteKeyError(f"no door {device!r} has reported a key yet")
            if door.get("pending"):
                door["key"] = door["pending"]
            if not door.get("key"):
                raise SiteKeyError(f"door {device!r} has reported no public key yet: start it, then approve")
            door["pending"] = None
            door["state"] = DoorKeyState.TRUSTED
            self._write(data)
        logger.warning("door %s: public key approved", device)

    def revoke(self, device: str) -> int:
        """Stop wrapping to ``device`` and make a new gallery key version; return it."""
        with self._locked():
            data = self._read()
            door = data["doors"].setdefault(device, {"key": "", "pending": None})
            door["state"] = DoorKeyState.REVOKED
            version = self._new_version(data, f"door {device} revoked")
            self._write(data)
            return version

    def doors(self) -> dict[str, dict[str, Any]]:
        """Every door's key state: ``{device: {"state", "pending"}}`` (public keys are not secret)."""
        with self._locked():
            data = self._read()
        return {d: {"state": v.get("state"), "key": v.get("key"), "pending": v.get("pending")}
                for d, v in sorted(data["doors"].items())}

    @property
    def current_version(self) -> int:
        """The current gallery key version (0: none made yet)."""
        with self._locked():
            return int(self._read()["current"])
