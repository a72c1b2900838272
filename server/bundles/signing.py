"""The server's Ed25519 signing key: generate (file mode 0600), load, sign; the public half in base64."""

from __future__ import annotations

import base64
import logging
import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device.bundles.signing import key_id, public_key_bytes

logger = logging.getLogger(__name__)

PRIVATE_MODE = 0o600


class SigningKeyError(Exception):
    """The signing key is missing, unreadable, not Ed25519, or would overwrite an existing key."""


def public_key_b64(key: Ed25519PrivateKey) -> str:
    """Base64 of the raw public key: what devices pin in ``bundle.public_key``."""
    return base64.b64encode(public_key_bytes(key.public_key())).decode("ascii")


def generate_key(path: Path, force: bool = False) -> Ed25519PrivateKey:
    """Create a new key at ``path`` (PKCS#8 PEM, mode 0600) and ``path.pub`` (base64); return it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not force:
        raise SigningKeyError(f"{path} already exists; pass --force to replace it (devices pinning the old "
                              "public key will then refuse new bundles)")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_MODE)
    try:
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, PRIVATE_MODE)
    os.replace(tmp, path)
    path.with_name(path.name + ".pub").write_text(public_key_b64(key) + "\n", encoding="ascii")
    logger.info("generated bundle signing key %s (key id %s)", path, key_id(key.public_key()))
    return key


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read a PEM Ed25519 private key; warn when other users can read it."""
    path = Path(path)
    try:
        data = path.read_bytes()
        mode = path.stat().st_mode
    except FileNotFoundError as exc:
        raise SigningKeyError(f"signing key {path} does not exist: run `facegate keys generate`") from exc
    except OSError as exc:
        raise SigningKeyError(f"cannot read signing key {path}: {exc}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning("signing key %s is readable by other users (mode %o); chmod 600 it", path,
                       mode & 0o777)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"{path} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{path} is not an Ed25519 key")
    return key


def sign(key: Ed25519PrivateKey, data: bytes) -> str:
    """Base64 Ed25519 signature of ``data``."""
    return base64.b64encode(key.sign(data)).decode("ascii")
