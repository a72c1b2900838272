"""Templates encrypted at rest: the one place that seals and opens ``Template.ciphertext``.

An embedding is biometric data, so it is stored like a chip: AES-256-GCM with the server's chip key
(:class:`server.crypto.ChipCipher`). The associated data binds the ciphertext to its row,
``template:<template id>:<person id>:<model sha256>``, so a vector copied onto another row, another
person or another model fails authentication instead of silently matching the wrong person. The
template id is therefore chosen before encryption (:func:`new_template`). Every reader (the server's
search index, the self-consistency check, re-embedding, the gallery export) calls :func:`open_template`.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from core.types import FloatArray
from server.crypto import ChipCipher, CryptoError
from server.db.models import Template, new_id


class TemplateRecord(Protocol):
    """The columns needed to open a template (an ORM ``Template`` or a selected row)."""

    @property
    def id(self) -> str:
        """Template id."""

    @property
    def person_id(self) -> str:
        """Owner."""

    @property
    def model_sha256(self) -> str:
        """Embedder that made the vector."""

    @property
    def ciphertext(self) -> bytes:
        """Sealed float32 vector."""

    @property
    def dim(self) -> int:
        """Vector length."""


def template_associated(template_id: str, person_id: str, model_sha256: str) -> str:
    """The associated data binding a template's ciphertext to its row, its person and its model."""
    return f"template:{template_id}:{person_id}:{model_sha256}"


def seal_vector(cipher: ChipCipher, vector: npt.ArrayLike, template_id: str, person_id: str,
                model_sha256: str) -> bytes:
    """The ciphertext of a float32 vector for one template row."""
    data = np.asarray(vector, dtype=np.float32).reshape(-1).tobytes()
    return cipher.encrypt(data, template_associated(template_id, person_id, model_sha256))


def new_template(cipher: ChipCipher, *, person_id: str, chip_id: str | None, model_sha256: str,
                 vector: npt.ArrayLike, quality: dict[str, Any] | None = None,
                 consistency: float | None = None, flagged: bool = False) -> Template:
    """A new ``Template`` row (id generated here) holding ``vector`` encrypted."""
    arr = np.asarray(vector, dtype=np.float32).reshape(-1)
    template_id = new_id()
    return Template(id=template_id, person_id=person_id, chip_id=chip_id, model_sha256=model_sha256,
                    ciphertext=seal_vector(cipher, arr, template_id, person_id, model_sha256),
                    key_id=cipher.key_id.hex(), dim=int(arr.size), quality=dict(quality or {}),
                    consistency=consistency, flagged=flagged)


def open_template(cipher: ChipCipher, row: TemplateRecord) -> FloatArray:
    """The float32 vector of a stored template; CryptoError on a wrong key, tampering or a bad length."""
    plain = cipher.decrypt(row.ciphertext, template_associated(row.id, row.person_id, row.model_sha256),
                           what="template")
    arr: FloatArray = np.frombuffer(plain, dtype=np.float32)
    if arr.size != row.dim:
        raise CryptoError(f"template {row.id} holds {arr.size} values, its row says {row.dim}")
    return arr
