"""Aligned chips and templates encrypted at rest with AES-256-GCM; the key comes from the environment or
a key file.

The key never enters the database. Each ciphertext carries a format byte, an 8-byte key id
(a truncated sha256 of the key, so a rotated key is detected instead of failing obscurely),
a random 96-bit nonce, and is bound to its row and person as associated data (chips:
``server.rowbinding``; templates: ``server.enrollment.templates``) so rows cannot be swapped or moved.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from core.files import atomic_write_bytes
from server.config import CHIP_KEY_BYTES, ServerConfig

logger = logging.getLogger(__name__)

FORMAT_V1 = b"\x01"
KEY_ID_BYTES = 8
NONCE_BYTES = 12  # the GCM standard nonce size
KEY_FILE_MODE = 0o600


class CryptoError(Exception):
    """The chip key is missing or malformed, or a ciphertext does not decrypt with it."""


def key_id(key: bytes) -> bytes:
    """Short, non-secret fingerprint of a key."""
    return hashlib.sha256(b"facegate-chip-key:" + key).digest()[:KEY_ID_BYTES]


class ChipCipher:
    """Encrypt and decrypt chip blobs with one AES-256-GCM key."""

    def __init__(self, key: bytes) -> None:
        if len(key) != CHIP_KEY_BYTES:
            raise CryptoError(f"chip key must be {CHIP_KEY_BYTES} bytes, got {len(key)}")
        self._aead = AESGCM(key)
        self.key_id = key_id(key)

    def encrypt(self, plaintext: bytes, associated: str) -> bytes:
        """Seal ``plaintext`` bound to ``associated`` (the chip id, or a template's binding string)."""
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, plaintext, associated.encode("utf-8"))
        return FORMAT_V1 + self.key_id + nonce + sealed

    def decrypt(self, blob: bytes, associated: str, what: str = "chip") -> bytes:
        """Open a blob made by :meth:`encrypt`; raise CryptoError on a wrong key or tampering.

        ``what`` names the kind of record in the error ("chip", "template"); never the plaintext.
        """
        header = 1 + KEY_ID_BYTES + NONCE_BYTES
        if len(blob) <= header or blob[:1] != FORMAT_V1:
            raise CryptoError(f"{what} ciphertext has an unknown format")
        if blob[1 : 1 + KEY_ID_BYTES] != self.key_id:
            raise CryptoError(f"{what} was encrypted with another key (rotated or wrong key configured)")
        nonce = blob[1 + KEY_ID_BYTES : header]
        try:
            return self._aead.decrypt(nonce, blob[header:], associated.encode("utf-8"))
        except InvalidTag as exc:
            raise CryptoError(f"{what} {associated} failed authentication (tampered or swapped)") from exc


def _decode_key(text: str, where: str) -> bytes:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise CryptoError(f"chip key in {where} is not base64") from exc
    if len(key) != CHIP_KEY_BYTES:
        raise CryptoError(f"chip key in {where} must decode to {CHIP_KEY_BYTES} bytes, got {len(key)}")
    return key


def cipher_from_text(text: str, where: str) -> ChipCipher:
    """The cipher of a base64 key read from ``where`` (a file name or "the environment")."""
    return ChipCipher(_decode_key(text, where))


def generate_key_text() -> str:
    """A fresh base64 key for FACEGATE_SERVER__CRYPTO__CHIP_KEY or a key file."""
    return base64.b64encode(secrets.token_bytes(CHIP_KEY_BYTES)).decode("ascii")


def load_chip_cipher(config: ServerConfig) -> ChipCipher:
    """The cipher from the env key, else the key file, else a newly created key file (when allowed)."""
    if config.crypto.chip_key is not None:
        return ChipCipher(_decode_key(config.crypto.chip_key.get_secret_value(), "the environment"))
    path: Path = config.chip_key_path
    if path.is_file():
        return ChipCipher(_decode_key(path.read_text(encoding="ascii"), str(path)))
    if not config.crypto.create_key_file:
        raise CryptoError(
            f"no chip key: set FACEGATE_SERVER__CRYPTO__CHIP_KEY or create {path} "
            "(python -c 'import base64,os;print(base64.b64encode(os.urandom(32)).decode())')"
        )
    text = generate_key_text()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, text.encode("ascii") + b"\n", mode=KEY_FILE_MODE)
    logger.warning("created a new chip key file at %s; back it up, chips cannot be read without it", path)
    return ChipCipher(_decode_key(text, str(path)))
