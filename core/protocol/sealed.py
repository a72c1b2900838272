"""Sealed gallery deltas: the wire form carries ``add``/``remove`` only as AES-GCM ciphertext.

The server seals a plaintext :class:`GalleryDelta` (:func:`seal_delta`) and then signs the sealed form,
so the signature covers the ciphertext and the key wraps; a door verifies that signature first and
only then opens it (:func:`open_delta`) with the gallery key its own wrap gave it.
"""

from __future__ import annotations

import json

from pydantic import ValidationError

from core.gallerycrypto import b64, delta_associated, open_sealed, seal, unb64
from core.protocol.schemas import GalleryDelta, KeyWrap, PayloadError, canonical_json


def seal_delta(delta: GalleryDelta, key: bytes, version: int, keys: list[KeyWrap]) -> GalleryDelta:
    """The unsigned sealed wire form of plaintext ``delta`` under gallery key ``version``."""
    content = canonical_json({"add": [p.model_dump(mode="json") for p in delta.add], "remove": delta.remove})
    blob = seal(key, content, delta_associated(delta.seq, delta.model_sha256))
    return delta.model_copy(update={"add": [], "remove": [], "sealed": b64(blob), "key_version": version,
                                    "keys": keys, "signature": None})


def open_delta(delta: GalleryDelta, key: bytes) -> GalleryDelta:
    """The plaintext delta of a sealed one (its signature already verified by the caller).

    Raises ``core.gallerycrypto.GalleryCryptoError`` when ``key`` does not open it, PayloadError when the
    opened content is not a valid add/remove list.
    """
    if delta.sealed is None:
        return delta
    content = open_sealed(key, unb64(delta.sealed, "sealed delta"), delta_associated(delta.seq,
                          delta.model_sha256), f"gallery delta {delta.seq}")
    try:
        data = json.loads(content)
        fields = {**delta.model_dump(mode="json"), "add": data["add"], "remove": data["remove"],
                  "sealed": None, "keys": []}
        return GalleryDelta.model_validate(fields)
    except (ValueError, KeyError, TypeError, ValidationError) as exc:
        raise PayloadError(f"gallery delta {delta.seq}: sealed content is malformed") from exc
