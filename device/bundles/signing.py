"""Ed25519 verification of bundle announcements and gallery deltas against the pinned server key."""

from __future__ import annotations

import base64
import binascii
import hashlib
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

RAW_KEY_BYTES = 32
SIGNATURE_BYTES = 64


class BundleKeyError(Exception):
    """The pinned public key is missing or unreadable."""


class SignatureError(Exception):
    """A signature is missing, malformed, or does not verify with the pinned key."""


def public_key_bytes(key: Ed25519PublicKey) -> bytes:
    """The raw 32-byte public key."""
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Ed25519PublicKey) -> str:
    """Short fingerprint of a public key (first 16 hex digits of the sha256 of its raw bytes)."""
    return hashlib.sha256(public_key_bytes(key)).hexdigest()[:16]


def _parse_key_text(text: str, where: str) -> Ed25519PublicKey:
    text = text.strip()
    if text.startswith("-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(text.encode("ascii"))
        except ValueError as exc:
            raise BundleKeyError(f"{where}: not a PEM public key: {exc}") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise BundleKeyError(f"{where}: the PEM key is not Ed25519")
        return key
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BundleKeyError(f"{where}: not base64 ({exc})") from exc
    if len(raw) != RAW_KEY_BYTES:
        raise BundleKeyError(f"{where}: an Ed25519 public key has {RAW_KEY_BYTES} bytes, got {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def load_public_key(value: str) -> Ed25519PublicKey:
    """The pinned key from config: base64 of the raw key, or a path to a file holding base64 or PEM."""
    value = value.strip()
    if not value:
        raise BundleKeyError("bundle.public_key is empty: run `facegate keys generate` on the server")
    candidate = Path(value).expanduser()
    # A base64 key may contain '/', so a path is recognised by existing (or by not being base64).
    try:
        is_file = candidate.is_file()
    except OSError:
        is_file = False
    if is_file:
        try:
            return _parse_key_text(candidate.read_text(encoding="ascii"), str(candidate))
        except (OSError, UnicodeDecodeError) as exc:
            raise BundleKeyError(f"cannot read public key file {candidate}: {exc}") from exc
    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BundleKeyError(f"bundle.public_key {value!r} is neither base64 nor an existing file") from exc
    return _parse_key_text(value, "bundle.public_key")


def verify(key: Ed25519PublicKey, signature_b64: str | None, data: bytes, what: str) -> None:
    """Check ``signature_b64`` over ``data``; raise SignatureError naming ``what`` and the failure."""
    if not signature_b64:
        raise SignatureError(f"{what} is unsigned")
    try:
        signature = base64.b64decode(signature_b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SignatureError(f"{what}: signature is not base64") from exc
    if len(signature) != SIGNATURE_BYTES:
        raise SignatureError(f"{what}: signature has {len(signature)} bytes, Ed25519 uses {SIGNATURE_BYTES}")
    try:
        key.verify(signature, data)
    except InvalidSignature as exc:
        raise SignatureError(f"{what}: bad signature (tampered, or signed with another key than "
                             f"{key_id(key)})") from exc
