"""A resumable bundle download: each received chunk is a file on disk, so restarts lose nothing.

``downloads/<seq>/announce.json`` holds the signed announcement; ``chunks/<file>.<index>`` each chunk
(written to a temp name and renamed). Chunks are checked against their own sha256 on receipt and against
the manifest's chunk geometry (count per file, size): a chunk that does not fit is a truncated or
tampered transfer. Assembly then checks each whole file against the signed manifest.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

from core.files import atomic_write_bytes
from core.protocol.schemas import BundleAnnounce, ChunkHeader, ChunkRef, PayloadError, manifest_bytes
from device.bundles.errors import BundleRejected, IncompleteDownload, RejectCode

logger = logging.getLogger(__name__)

ANNOUNCE_FILE = "announce.json"
# Bytes copied at a time while assembling files from chunks.
COPY_BLOCK = 1 << 20


class Download:
    """Chunks of one bundle sequence received so far."""

    def __init__(self, root: Path, announce: BundleAnnounce) -> None:
        self.root = Path(root)
        self.announce = announce
        self.manifest = announce.manifest
        self.chunks_dir = self.root / "chunks"
        stored = self._stored_announce()
        if stored is not None and manifest_bytes(stored.manifest) != manifest_bytes(self.manifest):
            logger.warning("download %s: manifest changed, starting over", self.root.name)
            shutil.rmtree(self.root, ignore_errors=True)
            stored = None
        self.chunks_dir.mkdir(parents=True, exist_ok=True)
        if stored is None:
            atomic_write_bytes(self.root / ANNOUNCE_FILE, announce.to_bytes())
        self._counts = [self.manifest.chunk_count(i) for i in range(len(self.manifest.files))]
        self.total = sum(self._counts)
        self._have: set[tuple[int, int]] = set()
        for entry in self.chunks_dir.iterdir():
            key = self._parse_name(entry.name)
            if key is not None:
                self._have.add(key)
            elif entry.name.startswith("."):
                entry.unlink(missing_ok=True)
        if self._have:
            logger.info("download %d: resuming with %d of %d chunks", self.manifest.sequence, len(self._have),
                        self.total)

    def _stored_announce(self) -> BundleAnnounce | None:
        try:
            return BundleAnnounce.parse((self.root / ANNOUNCE_FILE).read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, PayloadError) as exc:
            logger.warning("download %s: stored announcement unreadable (%s)", self.root.name, exc)
            return None

    @staticmethod
    def _parse_name(name: str) -> tuple[int, int] | None:
        parts = name.split(".")
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            return int(parts[0]), int(parts[1])
        return None

    def _chunk_path(self, file_index: int, index: int) -> Path:
        return self.chunks_dir / f"{file_index}.{index}"

    @property
    def sequence(self) -> int:
        """Bundle sequence."""
        return self.manifest.sequence

    @property
    def received(self) -> int:
        """Chunks on disk."""
        return len(self._have)

    @property
    def percent(self) -> float:
        """Share of chunks received, 0..100."""
        return 100.0 * len(self._have) / self.total if self.total else 100.0

    @property
    def complete(self) -> bool:
        """Every chunk is on disk."""
        return len(self._have) >= self.total

    def expected_size(self, file_index: int, index: int) -> int:
        """Bytes chunk ``index`` of file ``file_index`` must hold."""
        size = self.manifest.files[file_index].size
        last = self._counts[file_index] - 1
        return self.manifest.chunk_size if index < last else size - last * self.manifest.chunk_size

    def add(self, header: ChunkHeader, data: bytes) -> bool:
        """Store a verified chunk; True when it was new. Raises BundleRejected when it cannot belong."""
        seq = self.manifest.sequence
        if header.file_index >= len(self._counts):
            raise BundleRejected(RejectCode.MALFORMED, f"bundle {seq}: chunk for file {header.file_index}, "
                                 f"the manifest has {len(self._counts)} files")
        expected_total = self._counts[header.file_index]
        path = self.manifest.files[header.file_index].path
        if header.total != expected_total:
            code = RejectCode.TRUNCATED if header.total < expected_total else RejectCode.TAMPERED
            raise BundleRejected(code, f"bundle {seq}: {path} sent as {header.total} chunks, the manifest "
                                 f"implies {expected_total}")
        if header.index >= expected_total:
            raise BundleRejected(RejectCode.TAMPERED,
                                 f"bundle {seq}: chunk {header.index} of {path} is out of range")
        want = self.expected_size(header.file_index, header.index)
        if len(data) != want:
            code = RejectCode.TRUNCATED if len(data) < want else RejectCode.TAMPERED
            raise BundleRejected(code, f"bundle {seq}: chunk {header.index} of {path} has {len(data)} bytes, "
                                 f"expected {want}")
        key = (header.file_index, header.index)
        if key in self._have:
            return False
        final = self._chunk_path(*key)
        tmp = final.with_name(f".{final.name}.tmp")
        with open(tmp, "wb") as handle:
            handle.write(data)
        os.replace(tmp, final)
        self._have.add(key)
        return True

    def missing(self, limit: int) -> list[ChunkRef]:
        """Up to ``limit`` chunks not received yet, in order."""
        out: list[ChunkRef] = []
        for file_index, count in enumerate(self._counts):
            for index in range(count):
                if (file_index, index) not in self._have:
                    out.append(ChunkRef(file_index=file_index, index=index))
                    if len(out) >= limit:
                        return out
        return out

    def assemble(self, dest: Path) -> None:
        """Write every file under ``dest``; damaged chunks are dropped (IncompleteDownload), a file that
        does not match the signed sha256 is a tampered transfer (BundleRejected)."""
        seq = self.manifest.sequence
        damaged = []
        for file_index, entry in enumerate(self.manifest.files):
            target = dest / entry.path
            target.parent.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha256()
            with open(target, "wb") as out:
                for index in range(self._counts[file_index]):
                    chunk = self._chunk_path(file_index, index)
                    try:
                        data = chunk.read_bytes()
                    except FileNotFoundError:
                        data = b""
                    if len(data) != self.expected_size(file_index, index):
                        damaged.append((file_index, index))
                        continue
                    digest.update(data)
                    out.write(data)
                out.flush()
                os.fsync(out.fileno())
            if damaged:
                continue
            if digest.hexdigest() != entry.sha256:
                for index in range(self._counts[file_index]):
                    self._chunk_path(file_index, index).unlink(missing_ok=True)
                    self._have.discard((file_index, index))
                raise BundleRejected(RejectCode.TAMPERED, f"bundle {seq}: {entry.path} does not match the "
                                     "sha256 in the signed manifest")
        if damaged:
            for key in damaged:
                self._chunk_path(*key).unlink(missing_ok=True)
                self._have.discard(key)
            raise IncompleteDownload(f"bundle {seq}: {len(damaged)} chunks damaged on disk; asking again")

    def discard(self) -> None:
        """Delete the partial download."""
        shutil.rmtree(self.root, ignore_errors=True)
        self._have.clear()
