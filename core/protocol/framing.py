"""The binary frame shared by bundle chunks (FGC1) and snapshots (FGS1): no base64 on the wire.

A frame is ``MAGIC (4 bytes) | uint32 big-endian header length N | N bytes of header JSON | data``.
:func:`unframe` checks the magic and the header length before anything is parsed; the caller parses
the header and checks the data against it (size, sha256).
"""

from __future__ import annotations

import struct

from core.protocol.schemas import PayloadError

_LEN = struct.Struct(">I")
# Headers are small; anything larger is garbage and is refused before parsing.
MAX_HEADER_BYTES = 4096


def frame(magic: bytes, header: bytes, data: bytes) -> bytes:
    """Join magic, header and data into one frame."""
    return magic + _LEN.pack(len(header)) + header + data


def unframe(payload: bytes, magic: bytes, what: str) -> tuple[bytes, bytes]:
    """Split a frame into (header bytes, data); raise PayloadError naming ``what`` when it is malformed."""
    if len(payload) < len(magic) + _LEN.size or not payload.startswith(magic):
        raise PayloadError(f"{what}: missing {magic.decode('ascii')} magic")
    (length,) = _LEN.unpack_from(payload, len(magic))
    start = len(magic) + _LEN.size
    if length > MAX_HEADER_BYTES or start + length > len(payload):
        raise PayloadError(f"{what}: header length {length} is out of range")
    return payload[start:start + length], payload[start + length:]
