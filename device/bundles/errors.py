"""Why a bundle or a gallery delta was refused: an enum of codes and one exception carrying it."""

from __future__ import annotations

import enum


class RejectCode(enum.StrEnum):
    """Machine-readable rejection reasons (the ack's ``reason`` starts with one)."""

    NO_KEY = "no_key"
    UNSIGNED = "unsigned"
    BAD_SIGNATURE = "bad_signature"
    REPLAY = "replay"
    MALFORMED = "malformed"
    GALLERY_MODEL = "gallery_model_mismatch"
    TAMPERED = "tampered"
    TRUNCATED = "truncated"
    SELFTEST = "selftest_failed"
    LOAD_FAILED = "load_failed"
    CORRUPT = "corrupt"
    PLAINTEXT = "plaintext_gallery"  # a gallery not sealed to the site's doors: a downgrade, refused
    NO_GALLERY_KEY = "no_gallery_key"  # sealed under a gallery key no wrap gave this door (revoked?)


class BundleRejected(Exception):
    """A bundle or delta is refused; the running bundle keeps serving."""

    def __init__(self, code: RejectCode, detail: str) -> None:
        super().__init__(f"{code.value}: {detail}")
        self.code = code
        self.detail = detail

    @property
    def reason(self) -> str:
        """``<code>: <detail>`` for acks (at most 256 characters)."""
        return str(self)[:256]


class IncompleteDownload(Exception):
    """Some chunks are missing or were damaged on disk; ask for them again."""
