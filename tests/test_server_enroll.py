"""Enrollment through the API with the real built models and real CelebA faces: quality gates with reasons,
bad uploads, duplicate check, self-consistency, chips encrypted at rest, verify and identify."""

from __future__ import annotations

import base64
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from device.config import DetectorConfig, QualityConfig
from device.vision.pipeline import FacePipeline
from device.vision.quality import check_enrollment
from models.face.image import decode_image
from server.app import create_app
from server.crypto import ChipCipher, CryptoError
from server.db.models import AuditEntry, Chip
from server.enrollment.recognition import RecognitionEngine
from server.rowbinding import chip_associated
from tests.face_kit import Faces, pick_faces
from tests.server_support import (
    jpeg_bytes,
    login,
    make_config,
    no_face_image,
    png_bytes,
    state_of,
    stored_bytes,
)

IDENTITIES_NEEDED = 3
IMAGES_PER_IDENTITY = 3
CANDIDATE_IDENTITIES = 40


@pytest.fixture(scope="module")
def pipeline(built_models: Path) -> Iterator[FacePipeline]:
    with FacePipeline.from_models_dir(built_models, DetectorConfig()) as pipe:
        yield pipe


@pytest.fixture(scope="module")
def faces(shared_dir: Path, pipeline: FacePipeline) -> Faces:
    """Pick identities whose photos pass the default gates and are separable by one threshold."""
    return pick_faces(shared_dir / "data" / "celeba-faces", pipeline, IDENTITIES_NEEDED, IMAGES_PER_IDENTITY,
                      CANDIDATE_IDENTITIES)


def _client(tmp_path: Path, built_models: Path, tau: float, db_url: str | None = None,
            **sections: Any) -> TestClient:
    config = make_config(tmp_path, db_url, models={"dir": str(built_models)},
                         recognition={"tau": tau}, rate_limit={"per_minute": 6000, "burst": 1000}, **sections)
    return TestClient(create_app(config, engine=RecognitionEngine.from_config(config), start_mqtt=False))


@pytest.fixture()
def client(tmp_path: Path, built_models: Path, faces: Faces, db_url: str) -> Iterator[TestClient]:
    with _client(tmp_path, built_models, faces.tau, db_url) as test_client:
        yield test_client


def _enroll(client: TestClient, name: str, images: list[bytes], consent: bool = True,
            override: bool = False, filenames: list[str] | None = None) -> Any:
    files = [("images", ((filenames or [])[i] if filenames else f"img{i}.jpg", data, "image/jpeg"))
             for i, data in enumerate(images)]
    return client.post("/api/enroll", headers=login(client), files=files,
                       data={"name": name, "consent": str(consent).lower(),
                             "override_duplicate": str(override).lower()})


def _db_bytes(client: TestClient) -> bytes:
    return stored_bytes(state_of(client).db)


def test_enroll_stores_encrypted_chips_and_templates_per_model(client: TestClient, faces: Faces,
                                                              pipeline: FacePipeline) -> None:
    images = faces.of(0)[:2]
    response = _enroll(client, "Ada Lovelace", images)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["accepted"] == 2 and body["rejected"] == 0
    assert all(r["status"] == "accepted" and "sharpness" in r["quality"] for r in body["results"])
    person = body["person"]
    assert person["templates"] == 2 and person["consent"] is True
    headers = login(client)
    templates = client.get(f"/api/persons/{person['id']}/templates", headers=headers).json()
    assert {t["model_sha256"] for t in templates} == {pipeline.model_sha256}
    assert all(t["dim"] == 128 and not t["flagged"] for t in templates)

    state = state_of(client)
    raw = _db_bytes(client)
    key_text = state.config.chip_key_path.read_text().strip()
    assert key_text.encode() not in raw and base64.b64decode(key_text) not in raw
    with state.db.session() as session:
        chips = session.scalars(select(Chip)).all()
        assert len(chips) == 2
        for chip, data in zip(sorted(chips, key=lambda c: c.created_at), images, strict=True):
            plain = state.cipher.decrypt(chip.ciphertext, chip_associated(chip.id, chip.person_id))
            assert plain.startswith(b"\x89PNG") and plain not in raw
            rgb = decode_image(plain)
            expected = pipeline.analyze(decode_image(data))[0].chip.rgb
            assert np.array_equal(rgb, expected)  # lossless: the chip can be re-embedded later
            assert expected.tobytes() not in raw and chip.ciphertext[30:94] in raw
            with pytest.raises(CryptoError):
                ChipCipher(b"\x00" * 32).decrypt(chip.ciphertext, chip_associated(chip.id, chip.person_id))
            with pytest.raises(CryptoError):
                state.cipher.decrypt(chip.ciphertext, "another-chip-id")
        audit = session.scalars(select(AuditEntry).where(AuditEntry.action == "enrolled")).one()
    assert audit.actor == "admin" and audit.consent is True and audit.person_id == person["id"]
    assert "consent=yes" in audit.detail


def _bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge image (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
            + chunk(b"IEND", b""))


def test_bad_uploads_get_a_clear_4xx(client: TestClient, faces: Faces) -> None:
    face = faces.of(0)[0]
    cases: list[tuple[str, bytes, int, str]] = [
        ("notes.txt", b"hello, this is not an image", 415, "not a JPEG or PNG"),
        ("cut.jpg", face[: len(face) // 2], 400, "truncated"),
        ("bomb.png", _bomb_png(60_000, 60_000), 413, "pixels"),
        ("huge.jpg", b"\xff\xd8\xff" + b"\x00" * (9 * 1024 * 1024), 413, "bytes"),
        ("empty.jpg", b"", 400, "empty"),
    ]
    for filename, data, code, words in cases:
        response = _enroll(client, "X", [data], filenames=[filename])
        assert response.status_code == code, (filename, response.text)
        result = response.json()["results"][0]
        assert result["status"] == "invalid" and words in result["error"], (filename, result)
        assert response.json()["person"] is None

    zero = _enroll(client, "Nobody", [png_bytes(no_face_image())])
    assert zero.status_code == 422
    failure = zero.json()["results"][0]["failures"][0]
    assert failure["gate"] == "face_count" and failure["measured"] == 0
    assert "exactly one" in failure["message"]

    a, b = (decode_image(faces.of(0)[0]), decode_image(faces.of(1)[0]))
    pair = np.concatenate([a, cv2.resize(b, (a.shape[1], a.shape[0]))], axis=1)
    several = _enroll(client, "Two", [jpeg_bytes(pair)])
    assert several.status_code == 422
    assert several.json()["results"][0]["failures"][0]["measured"] == 2

    no_consent = _enroll(client, "Ada", [face], consent=False)
    assert no_consent.status_code == 422 and "consent" in no_consent.json()["detail"]
    assert client.get("/api/persons", headers=login(client)).json()["total"] == 0


def test_filenames_never_reach_the_filesystem(client: TestClient, faces: Faces) -> None:
    data_dir = state_of(client).config.data_dir
    before = {p.relative_to(data_dir) for p in data_dir.rglob("*")}
    evil = "../../../../tmp/facegate-evil.jpg"
    response = _enroll(client, "Path", [faces.of(0)[0]], filenames=[evil])
    assert response.status_code == 201
    assert response.json()["results"][0]["filename"] == evil  # echoed for display only
    after = {p.relative_to(data_dir) for p in data_dir.rglob("*")}
    assert after == before
    assert not Path("/tmp/facegate-evil.jpg").exists()


def test_quality_gates_say_which_failed_and_by_how_much(tmp_path: Path, built_models: Path, faces: Faces,
                                                         pipeline: FacePipeline) -> None:
    sharp = decode_image(faces.of(0)[0])
    blurred = None
    for sigma in (2.0, 3.0, 4.0, 6.0, 8.0):
        candidate = np.asarray(cv2.GaussianBlur(sharp, (0, 0), sigma), np.uint8)
        report = check_enrollment(candidate, pipeline, QualityConfig())
        gates = {f.gate for f in report.failures}
        if "sharpness" in gates and "face_count" not in gates:
            blurred = candidate
            break
    assert blurred is not None, "no blur level made the face soft yet detectable"
    with _client(tmp_path / "a", built_models, faces.tau) as client:
        response = _enroll(client, "Blurry", [jpeg_bytes(blurred, quality=98)])
        assert response.status_code == 422
        failure = next(f for f in response.json()["results"][0]["failures"] if f["gate"] == "sharpness")
        assert failure["measured"] < failure["limit"] == QualityConfig().min_sharpness
        assert "below the minimum" in failure["message"]
    with _client(tmp_path / "b", built_models, faces.tau, quality={"min_face_px": 2000}) as strict:
        response = _enroll(strict, "Small", [faces.of(0)[0]])
        assert response.status_code == 422
        failure = next(f for f in response.json()["results"][0]["failures"] if f["gate"] == "face_size")
        assert failure["limit"] == 2000 and 0 < failure["measured"] < 2000
        assert f"{2000 - failure['measured']:.3g}" in failure["message"]


def test_duplicate_is_blocked_unless_an_admin_overrides(client: TestClient, faces: Faces) -> None:
    first = _enroll(client, "Original", faces.of(0)[:1])
    assert first.status_code == 201
    original = first.json()["person"]["id"]
    dup = _enroll(client, "Impostor", faces.of(0)[1:2])
    assert dup.status_code == 409
    result = dup.json()["results"][0]
    assert result["status"] == "duplicate" and result["duplicate"]["person_id"] == original
    assert result["duplicate"]["score"] >= faces.tau and "override" in result["error"]
    assert client.get("/api/persons", headers=login(client)).json()["total"] == 1
    forced = _enroll(client, "Twin", faces.of(0)[1:2], override=True)
    assert forced.status_code == 201 and forced.json()["results"][0]["duplicate"]["person_id"] == original
    with state_of(client).db.session() as session:
        overrides = session.scalars(select(AuditEntry).where(AuditEntry.action == "duplicate_override")).all()
    assert len(overrides) == 1 and original in overrides[0].detail
    other = _enroll(client, "Someone else", faces.of(1)[:1])
    assert other.status_code == 201


def test_a_template_far_from_the_others_is_flagged(client: TestClient, faces: Faces) -> None:
    person = _enroll(client, "Consistent", faces.of(0)[:2]).json()["person"]
    files = [("images", ("wrong.jpg", faces.of(1)[0], "image/jpeg"))]
    response = client.post(f"/api/persons/{person['id']}/images", headers=login(client), files=files)
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    assert result["accepted"] and result["flagged"] and result["consistency"] < faces.tau
    good = client.post(f"/api/persons/{person['id']}/images", headers=login(client),
                       files=[("images", ("right.jpg", faces.of(0)[2], "image/jpeg"))]).json()["results"][0]
    assert good["accepted"] and not good["flagged"]
    assert response.json()["person"]["flagged_templates"] == 1


def test_verify_and_identify(client: TestClient, faces: Faces) -> None:
    a = _enroll(client, "Alice", faces.of(0)[:2]).json()["person"]["id"]
    b = _enroll(client, "Bob", faces.of(1)[:2]).json()["person"]["id"]
    headers = login(client)

    def verify(person_id: str, data: bytes) -> Any:
        return client.post("/api/verify", headers=headers, data={"person_id": person_id},
                           files={"image": ("probe.jpg", data, "image/jpeg")})

    same = verify(a, faces.of(0)[2]).json()
    assert same["match"] is True and same["score"] >= faces.tau and same["person_id"] == a
    other = verify(a, faces.of(1)[2]).json()
    assert other["match"] is False and other["score"] < faces.tau
    assert verify("nobody", faces.of(0)[2]).status_code == 404
    assert verify(a, png_bytes(no_face_image())).status_code == 422
    assert verify(a, b"not an image").status_code == 415

    found = client.post("/api/identify", headers=headers, data={"top_k": "2"},
                        files={"image": ("probe.jpg", faces.of(1)[2], "image/jpeg")}).json()
    assert found["match"] is True and [c["person_id"] for c in found["candidates"]] == [b, a]
    stranger = client.post("/api/identify", headers=headers,
                           files={"image": ("probe.jpg", faces.of(2)[0], "image/jpeg")}).json()
    assert stranger["match"] is False and stranger["candidates"][0]["score"] < faces.tau
