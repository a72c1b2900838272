"""Gallery encryption shared by the server (seal, wrap) and the doors (unwrap, open).

The key hierarchy (see the README, "Gallery encryption"):

- each door holds an X25519 key pair made on the door; only the public half leaves it;
- each site has a random 256-bit *gallery key* with a version number; the server keeps it encrypted at
  rest under its chip key and makes a new version whenever a door is revoked;
- the gallery content of bundles and deltas is AES-256-GCM under the gallery key (:func:`seal`);
- the gallery key reaches each door as a :class:`core.protocol.schemas.KeyWrap`: an ephemeral X25519
  key agreement with the door's public key, HKDF-SHA256, then AES-256-GCM over the gallery key, with
  the door id and key version as associated data (a wrap cannot be replayed to another door or version).

Every ciphertext here is ``nonce (12 bytes) || AES-GCM ciphertext and tag``, in base64 on the wire.
"""

from __future__ import annotations

import base64
import binascii
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

GALLERY_KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12  # the GCM standard nonce size
X25519_KEY_BYTES = 32
WRAP_INFO = b"facegate gallery key wrap v1"  # HKDF info: separates this use of the shared secret


class GalleryCryptoError(Exception):
    """A ciphertext or key wrap does not open (wrong key, another door, tampered) or is malformed."""


def b64(data: bytes) -> str:
    """Standard base64 text of ``data``."""
    return base64.b64encode(data).decode("ascii")


def unb64(text: str, what: str) -> bytes:
    """Decode base64 ``text``; a clear error naming ``what`` when it is not base64."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise GalleryCryptoError(f"{what} is not base64") from exc


def new_gallery_key() -> bytes:
    """A fresh random 256-bit gallery key."""
    return os.urandom(GALLERY_KEY_BYTES)


def seal(key: bytes, plaintext: bytes, associated: str) -> bytes:
    """AES-256-GCM ``plaintext`` under ``key`` bound to ``associated``: nonce || ciphertext."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated.encode("utf-8"))


def open_sealed(key: bytes, blob: bytes, associated: str, what: str) -> bytes:
    """Open :func:`seal`'s output; GalleryCryptoError (naming ``what``, never the content) otherwise."""
    if len(blob) <= NONCE_BYTES:
        raise GalleryCryptoError(f"{what}: ciphertext too short")
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], associated.encode("utf-8"))
    except InvalidTag as exc:
        raise GalleryCryptoError(f"{what} does not open with this gallery key (another key version, "
                                 "or tampered)") from exc


def wrap_associated(device_id: str, version: int) -> str:
    """Associated data of a key wrap: it binds the wrap to one door and one key version."""
    return f"facegate-gallery-key|{device_id}|{version}"


def _wrap_key(shared: bytes, ephemeral_public: bytes, door_public: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=GALLERY_KEY_BYTES, salt=ephemeral_public + door_public,
                info=WRAP_INFO).derive(shared)


def public_bytes(key: X25519PublicKey) -> bytes:
    """Raw 32 bytes of an X25519 public key."""
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_public(text: str) -> X25519PublicKey:
    """An X25519 public key from base64 of its raw 32 bytes."""
    raw = unb64(text, "door public key")
    if len(raw) != X25519_KEY_BYTES:
        raise GalleryCryptoError(f"door public key must be {X25519_KEY_BYTES} bytes, got {len(raw)}")
    return X25519PublicKey.from_public_bytes(raw)


def wrap(gallery_key: bytes, door_public: X25519PublicKey, device_id: str, version: int) -> tuple[str, str]:
    """(ephemeral public key, sealed gallery key), both base64: the gallery key wrapped to one door."""
    ephemeral = X25519PrivateKey.generate()
    epk = public_bytes(ephemeral.public_key())
    kek = _wrap_key(ephemeral.exchange(door_public), epk, public_bytes(door_public))
    return b64(epk), b64(seal(kek, gallery_key, wrap_associated(device_id, version)))


def unwrap(door_private: X25519PrivateKey, epk_b64: str, sealed_b64: str, device_id: str,
           version: int) -> bytes:
    """The gallery key of a wrap made by :func:`wrap` for this door and version."""
    epk = unb64(epk_b64, "key wrap ephemeral key")
    if len(epk) != X25519_KEY_BYTES:
        raise GalleryCryptoError("key wrap ephemeral key has the wrong length")
    try:
        shared = door_private.exchange(X25519PublicKey.from_public_bytes(epk))
    except ValueError as exc:  # an all-zero shared secret: a malicious ephemeral key
        raise GalleryCryptoError(f"key wrap ephemeral key is unusable: {exc}") from exc
    kek = _wrap_key(shared, epk, public_bytes(door_private.public_key()))
    key = open_sealed(kek, unb64(sealed_b64, "key wrap"), wrap_associated(device_id, version),
                      f"gallery key {version} wrap for {device_id}")
    if len(key) != GALLERY_KEY_BYTES:
        raise GalleryCryptoError("wrapped gallery key has the wrong length")
    return key


def delta_associated(seq: int, model_sha256: str) -> str:
    """Associated data of a sealed delta: its sequence and embedder (copying it to another fails)."""
    return f"facegate-delta|{seq}|{model_sha256}"


def file_associated(sequence: int, path: str) -> str:
    """Associated data of one sealed bundle gallery file: its bundle sequence and path."""
    return f"facegate-bundle-file|{sequence}|{path}"
