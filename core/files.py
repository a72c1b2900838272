"""File helpers both sides use: one streamed sha256, one atomic write (bytes or a streaming writer)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

HASH_CHUNK = 1 << 20  # bytes read per step when hashing a file
PRIVATE_MODE = 0o600  # biometric data (galleries) written through a streaming writer


def sha256_file(path: Path, chunk: int = HASH_CHUNK) -> str:
    """Hex sha256 of a file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _read_umask() -> int:
    """The process umask without changing it (Linux /proc), else by the set-and-restore dance."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    current = os.umask(0o077)  # restrictive while it is briefly changed: no other thread gets 0666
    os.umask(current)
    return current


# Read once, at import: os.umask() is process-wide, and flipping it later could race other threads.
_UMASK = _read_umask()


def fsync_dir(directory: Path) -> None:
    """Flush a folder entry so a rename inside it survives a power cut."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, writer: Callable[[BinaryIO], object], mode: int | None = PRIVATE_MODE) -> str:
    """Write through ``writer`` into a temp file in the same folder, fsync, rename over ``path``, fsync the
    folder; return the file's sha256.

    The file gets ``mode`` (0o600 by default: keys and biometric data) or, with ``mode=None``, what
    ``open()`` would give a new file under the process umask.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode if mode is not None else 0o666 & ~_UMASK)
        with os.fdopen(fd, "w+b") as handle:
            writer(handle)
            handle.flush()
            os.fsync(handle.fileno())
            handle.seek(0)
            digest = hashlib.sha256()
            while block := handle.read(HASH_CHUNK):
                digest.update(block)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`); default mode from the umask."""
    atomic_write(path, lambda handle: handle.write(data), mode)


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created, mode 0600) across processes: server
    replicas sharing a data_dir serialize their read-modify-write of one state file with it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
