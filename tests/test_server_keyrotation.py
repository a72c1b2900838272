"""Chip-key rotation on a real enrolled database (SQLite and PostgreSQL): every chip and template is
re-encrypted under the new key, the old key is retired (kept, 0600), the server reads everything with the
new key, and an interrupted rotation finishes when rerun."""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from sqlalchemy import select

from device.config import DetectorConfig
from device.vision.pipeline import FacePipeline
from server import keyrotation
from server.app import create_app
from server.bundles.delta import DeltaLedger
from server.cli import cli as server_cli
from server.config import ServerConfig
from server.crypto import ChipCipher, CryptoError, generate_key_text, load_chip_cipher
from server.db.models import AuditEntry, Chip, Template
from server.db.session import Database
from server.enrollment.recognition import RecognitionEngine
from server.enrollment.reembed import open_chip
from server.enrollment.templates import open_template
from server.rowbinding import bind_chip_rows, chip_associated
from tests.face_kit import Faces, pick_faces
from tests.server_support import login, make_config

PERSONS = 2


@pytest.fixture(scope="module")
def faces(shared_dir: Path, built_models: Path) -> Faces:
    with FacePipeline.from_models_dir(built_models, DetectorConfig()) as pipeline:
        return pick_faces(shared_dir / "data" / "celeba-faces", pipeline, identities=PERSONS,
                          per_identity=3, candidates=40)


def _config(tmp_path: Path, built_models: Path, faces: Faces, db_url: str) -> ServerConfig:
    return make_config(tmp_path, db_url, models={"dir": str(built_models)}, recognition={"tau": faces.tau},
                       rate_limit={"per_minute": 6000, "burst": 1000})


def _client(config: ServerConfig) -> TestClient:
    return TestClient(create_app(config, engine=RecognitionEngine.from_config(config), start_mqtt=False))


@pytest.fixture()
def enrolled(tmp_path: Path, built_models: Path, faces: Faces, db_url: str) -> Iterator[ServerConfig]:
    """A server database (each engine) with two enrolled persons (two images each); the server is stopped
    after."""
    config = _config(tmp_path, built_models, faces, db_url)
    with _client(config) as client:
        for i in range(PERSONS):
            files = [("images", (f"img{j}.jpg", data, "image/jpeg"))
                     for j, data in enumerate(faces.of(i)[:2])]
            response = client.post("/api/enroll", headers=login(client), files=files,
                                   data={"name": f"Person {i}", "consent": "true"})
            assert response.status_code == 201, response.text
    yield config


def _plaintexts(config: ServerConfig, cipher: ChipCipher) -> dict[str, bytes]:
    """Every chip and template opened with ``cipher``, by row id (raises CryptoError with a wrong key)."""
    out: dict[str, bytes] = {}
    with Database(config.database_url) as db, db.session() as session:
        for chip in session.scalars(select(Chip)):
            out[chip.id] = cipher.decrypt(chip.ciphertext, chip_associated(chip.id, chip.person_id))
        for template in session.scalars(select(Template)):
            out[template.id] = open_template(cipher, template).tobytes()
    return out


def _key_ids(config: ServerConfig) -> set[str]:
    with Database(config.database_url) as db, db.session() as session:
        return set(session.scalars(select(Chip.key_id))) | set(session.scalars(select(Template.key_id)))


def _toml(config: ServerConfig, tmp_path: Path) -> Path:
    path = tmp_path / "server.toml"
    path.write_text(f'data_dir = "{config.data_dir}"\n[mqtt]\nenabled = false\n'
                    f'[database]\nurl = "{config.database_url}"\n', encoding="utf-8")
    return path


def test_rotation_reencrypts_everything_and_the_server_reads_it(enrolled: ServerConfig, tmp_path: Path,
                                                                faces: Faces) -> None:
    config = enrolled
    old = load_chip_cipher(config)
    before = _plaintexts(config, old)
    assert len(before) == PERSONS * 2 * 2  # a chip and a template per image
    ledger = DeltaLedger(config.bundles_root, old)  # the gallery delta ledger, sealed under the chip key
    ledger.remove("someone-deleted")

    result = CliRunner().invoke(server_cli, ["rotate-chip-key", "--config", str(_toml(config, tmp_path)),
                                             "--yes"])
    assert result.exit_code == 0, result.output
    assert "4 chips and 4 templates re-encrypted" in result.output
    assert "delta ledger re-sealed" in result.output

    new = load_chip_cipher(config)
    assert new.key_id != old.key_id
    assert _key_ids(config) == {new.key_id.hex()}
    assert _plaintexts(config, new) == before  # same chips and vectors, new key
    with pytest.raises(CryptoError, match="another key"):
        _plaintexts(config, old)
    assert DeltaLedger(config.bundles_root, new).removes == {"someone-deleted"}
    key_file = config.chip_key_path
    retired = key_file.with_name(f"{key_file.name}.old-{old.key_id.hex()}")
    assert retired.is_file() and not key_file.with_name(key_file.name + ".new").exists()
    for path in (key_file, retired):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with Database(config.database_url) as db, db.session() as session:
        audit = session.scalars(select(AuditEntry).where(AuditEntry.action == "key_rotated")).one()
        assert old.key_id.hex() in audit.detail and new.key_id.hex() in audit.detail

    with _client(config) as client:  # a restarted server opens everything with the installed key
        response = client.post("/api/identify", headers=login(client),
                               files={"image": ("probe.jpg", faces.of(0)[2], "image/jpeg")})
        assert response.status_code == 200, response.text
        assert response.json()["candidates"][0]["name"] == "Person 0"


def test_an_interrupted_rotation_finishes_when_rerun(enrolled: ServerConfig,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    config = enrolled
    old = load_chip_cipher(config)
    before = _plaintexts(config, old)
    monkeypatch.setattr(keyrotation, "BATCH_ROWS", 1)
    batches: list[int] = []

    def crash_after_three(n: int) -> None:
        batches.append(n)
        if len(batches) == 3:
            raise KeyboardInterrupt  # as if the process were stopped mid-way

    with Database(config.database_url) as db:
        with pytest.raises(KeyboardInterrupt):
            keyrotation.rotate_chip_key(config, db, progress=crash_after_three)
        staged = config.chip_key_path.with_name(config.chip_key_path.name + ".new")
        assert staged.is_file() and len(_key_ids(config)) == 2  # half rotated, old key still installed
        report = keyrotation.rotate_chip_key(config, db)
    assert report.skipped == 3 and report.chips + report.templates == len(before) - 3
    new = load_chip_cipher(config)
    assert _key_ids(config) == {new.key_id.hex()} and _plaintexts(config, new) == before


def test_a_tampered_row_stops_the_rotation_before_anything_changes(enrolled: ServerConfig) -> None:
    config = enrolled
    old = load_chip_cipher(config)
    with Database(config.database_url) as db:
        with db.transaction() as session:  # swap two templates' ciphertexts
            first, second = session.scalars(select(Template).limit(2)).all()
            first.ciphertext, second.ciphertext = second.ciphertext, first.ciphertext
        with pytest.raises(keyrotation.KeyRotationError, match=r"failed authentication.*nothing was changed"):
            keyrotation.rotate_chip_key(config, db)
    assert load_chip_cipher(config).key_id == old.key_id
    assert not config.chip_key_path.with_name(config.chip_key_path.name + ".new").exists()
    assert _key_ids(config) == {old.key_id.hex()}


def test_an_env_key_needs_a_file_for_its_successor(enrolled: ServerConfig, tmp_path: Path) -> None:
    key_text = enrolled.chip_key_path.read_text(encoding="ascii").strip()
    config = make_config(tmp_path, enrolled.database_url,
                         crypto={"chip_key": key_text, "create_key_file": False})
    enrolled.chip_key_path.unlink()  # the key now lives only in the environment
    with Database(config.database_url) as db:
        with pytest.raises(keyrotation.KeyRotationError, match="--new-key-file"):
            keyrotation.rotate_chip_key(config, db)
        target = tmp_path / "next.key"
        report = keyrotation.rotate_chip_key(config, db, new_key_file=target)
    assert report.key_file == target and report.retired_key_file is None
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert _key_ids(config) == {report.new_key_id}


def test_row_binding_a_chip_moved_to_another_person_does_not_open(enrolled: ServerConfig) -> None:
    """A database writer who moves a chip (or a template) to another person gets rows that fail
    authentication: re-embedding cannot build person B's template from face A."""
    cipher = load_chip_cipher(enrolled)
    with Database(enrolled.database_url) as db:
        with db.transaction() as session:
            chips = session.scalars(select(Chip).order_by(Chip.id)).all()
            other = next(c.person_id for c in chips if c.person_id != chips[0].person_id)
            moved_id, chips[0].person_id = chips[0].id, other
            template = session.scalars(select(Template).where(Template.person_id != other)).first()
            assert template is not None
            template.person_id, template_id = other, template.id
        with db.session() as session:
            moved, row = session.get(Chip, moved_id), session.get(Template, template_id)
            assert moved is not None and row is not None
            with pytest.raises(CryptoError, match="failed authentication"):
                open_chip(cipher, moved)
            with pytest.raises(CryptoError, match="failed authentication"):
                open_template(cipher, row)
        report = bind_chip_rows(db, cipher)  # the migration does not "repair" a moved chip either
    assert moved_id in report.refused and report.bound == 0


def test_row_binding_migration_binds_legacy_chips_once(enrolled: ServerConfig, tmp_path: Path) -> None:
    """Chips sealed the old way (chip id only) are re-sealed bound to their person, idempotently, at
    start or via `facegate server bind-rows`; a legacy chip moved to another person is refused."""
    cipher = load_chip_cipher(enrolled)
    with Database(enrolled.database_url) as db:
        with db.transaction() as session:  # back to the pre-binding format
            chips = session.scalars(select(Chip).order_by(Chip.id)).all()
            for chip in chips:
                plain = cipher.decrypt(chip.ciphertext, chip_associated(chip.id, chip.person_id))
                chip.ciphertext = cipher.encrypt(plain, chip.id)
            other = next(c.person_id for c in chips if c.person_id != chips[0].person_id)
            chips[0].person_id, moved_id = other, chips[0].id
        with db.session() as session:
            legacy = session.scalars(select(Chip).where(Chip.id != moved_id)).first()
            assert legacy is not None
            with pytest.raises(CryptoError):  # not readable until migrated
                open_chip(cipher, legacy)
    result = CliRunner().invoke(server_cli, ["bind-rows", "--config", str(_toml(enrolled, tmp_path))])
    assert result.exit_code == 1, result.output  # one refused row: non-zero, the others bound
    first = json.loads(result.output.strip().splitlines()[-1])
    assert first == {"bound": len(chips) - 1, "already": 0, "refused": [moved_id]}
    with Database(enrolled.database_url) as db:
        again = bind_chip_rows(db, cipher)
        assert (again.bound, again.already, again.refused) == (0, len(chips) - 1, (moved_id,))
        with db.session() as session:
            for chip in session.scalars(select(Chip).where(Chip.id != moved_id)):
                assert open_chip(cipher, chip).size > 0


def test_row_binding_rotation_checks_no_rows_left_then_removes_old_key(enrolled: ServerConfig,
                                                                       tmp_path: Path) -> None:
    """The rotation's final check refuses to retire the old key while a row is under it; after a
    confirmed rotation `remove-old-chip-key` deletes the retired key file (and refuses before)."""
    config = enrolled
    toml = str(_toml(config, tmp_path))
    early = CliRunner().invoke(server_cli, ["remove-old-chip-key", "--config", toml, "--yes"])
    assert early.exit_code == 0 and "no retired" in early.output
    old = load_chip_cipher(config)
    with Database(config.database_url) as db:
        real = keyrotation._rotate_rows

        def leave_one(*args: Any, **kwargs: Any) -> tuple[int, int, int]:
            counts = real(*args, **kwargs)
            new = args[2]
            with db.transaction() as session:  # a row sealed under the old key while rotating
                chip = session.scalars(select(Chip)).first()
                assert chip is not None
                associated = chip_associated(chip.id, chip.person_id)
                chip.ciphertext = old.encrypt(new.decrypt(chip.ciphertext, associated), associated)
                chip.key_id = old.key_id.hex()
            return counts

        keyrotation._rotate_rows = leave_one
        try:
            with pytest.raises(keyrotation.KeyRotationError, match="not under the new key"):
                keyrotation.rotate_chip_key(config, db)
        finally:
            keyrotation._rotate_rows = real
        assert load_chip_cipher(config).key_id == old.key_id  # the old key stays installed
        report = keyrotation.rotate_chip_key(config, db)  # rerun: finishes the job
    assert report.retired_key_file is not None and report.retired_key_file.is_file()
    removed = CliRunner().invoke(server_cli, ["remove-old-chip-key", "--config", toml, "--yes"])
    assert removed.exit_code == 0, removed.output
    assert old.key_id.hex() in removed.output and not report.retired_key_file.exists()
    assert _plaintexts(config, load_chip_cipher(config))  # everything still opens


def test_row_binding_unconfirmed_old_key_is_not_removed(enrolled: ServerConfig, tmp_path: Path) -> None:
    """A stray `.old-*` key file with no audited rotation away from it is kept."""
    stray = enrolled.chip_key_path.with_name(f"{enrolled.chip_key_path.name}.old-feedface")
    stray.write_text(generate_key_text() + "\n", encoding="ascii")
    result = CliRunner().invoke(server_cli, ["remove-old-chip-key", "--config",
                                             str(_toml(enrolled, tmp_path)), "--yes"])
    assert result.exit_code != 0 and "no finished rotation" in result.output and stray.is_file()
