"""Chip ciphertexts bound to their person: the associated data is ``chip:<chip id>:<person id>``.

Templates were always bound to their row, person and model (``server.enrollment.templates``). Chips were
bound to the chip id only, so a database writer could move a chip to another person and the next re-embed
would build that person's template from someone else's face. :func:`bind_chip_rows` migrates old rows:
a chip sealed under the old associated data is re-sealed under the new one only when a template that
references it authenticates the same person (template associated data carries the person id); anything
else is left unreadable and reported. It is idempotent and runs at server start and as
``facegate server bind-rows``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import select

from server.crypto import ChipCipher, CryptoError
from server.db.models import Chip, Template
from server.db.session import Database
from server.enrollment.templates import template_associated

logger = logging.getLogger(__name__)


def chip_associated(chip_id: str, person_id: str) -> str:
    """The associated data binding a chip's ciphertext to its row and its person."""
    return f"chip:{chip_id}:{person_id}"


@dataclass(frozen=True, slots=True)
class BindingReport:
    """What :func:`bind_chip_rows` found: re-sealed, already bound, and refused chip ids."""

    bound: int
    already: int
    refused: tuple[str, ...]


def _person_vouched(cipher: ChipCipher, templates: list[Template], person_id: str) -> bool:
    """Whether one of the chip's templates authenticates under ``person_id``."""
    for row in templates:
        if row.person_id != person_id or row.key_id != cipher.key_id.hex():
            continue
        try:
            cipher.decrypt(row.ciphertext, template_associated(row.id, row.person_id, row.model_sha256),
                           what="template")
        except CryptoError:
            continue
        return True
    return False


def bind_chip_rows(db: Database, cipher: ChipCipher) -> BindingReport:
    """Re-seal every chip still under the old (chip id only) associated data; idempotent."""
    bound = already = 0
    refused: list[str] = []
    with db.transaction() as session:
        for chip in session.scalars(select(Chip).order_by(Chip.id)):
            if chip.key_id != cipher.key_id.hex():
                refused.append(chip.id)
                continue
            try:
                cipher.decrypt(chip.ciphertext, chip_associated(chip.id, chip.person_id))
                already += 1
                continue
            except CryptoError:
                pass
            try:
                plain = cipher.decrypt(chip.ciphertext, chip.id)
            except CryptoError:
                refused.append(chip.id)
                continue
            templates = list(session.scalars(select(Template).where(Template.chip_id == chip.id)))
            if not _person_vouched(cipher, templates, chip.person_id):
                refused.append(chip.id)
                continue
            chip.ciphertext = cipher.encrypt(plain, chip_associated(chip.id, chip.person_id))
            bound += 1
    if bound:
        logger.warning("bound %d chip row(s) to their person (associated data migration)", bound)
    if refused:
        logger.error("%d chip row(s) do not authenticate as bound to their person (moved, tampered or under "
                     "another key); they stay unreadable", len(refused))
    return BindingReport(bound, already, tuple(refused))
