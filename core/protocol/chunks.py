"""Binary framing of bundle chunks (no base64: a 25 MB bundle stays 25 MB on the wire).

A frame is::

    b"FGC1" | uint32 big-endian header length N | N bytes of ChunkHeader JSON | data

The header names the bundle sequence, file index, chunk index, chunk count of the file,
the data length and the sha256 of the data. :func:`decode_chunk` checks all of that.
"""

from __future__ import annotations

import hashlib

from core.protocol.framing import frame, unframe
from core.protocol.schemas import ChunkHeader, PayloadError

MAGIC = b"FGC1"


def encode_chunk(header: ChunkHeader, data: bytes) -> bytes:
    """Frame ``data`` with its header."""
    return frame(MAGIC, header.to_bytes(), data)


def make_chunk(sequence: int, file_index: int, index: int, total: int, data: bytes,
               correlation_id: str | None = None) -> bytes:
    """Build the header for ``data`` and frame it."""
    header = ChunkHeader(sequence=sequence, file_index=file_index, index=index, total=total, size=len(data),
                         sha256=hashlib.sha256(data).hexdigest(), correlation_id=correlation_id)
    return encode_chunk(header, data)


def decode_chunk(payload: bytes) -> tuple[ChunkHeader, bytes]:
    """Split a frame into header and data; raise PayloadError when it is malformed or corrupted."""
    raw, data = unframe(payload, MAGIC, "chunk")
    header = ChunkHeader.parse(raw)
    if len(data) != header.size:
        raise PayloadError(f"chunk {header.file_index}/{header.index}: {len(data)} bytes, header says "
                           f"{header.size}")
    if hashlib.sha256(data).hexdigest() != header.sha256:
        raise PayloadError(f"chunk {header.file_index}/{header.index}: sha256 mismatch")
    if header.index >= header.total:
        raise PayloadError(f"chunk {header.file_index}/{header.index}: index beyond total {header.total}")
    return header, data
