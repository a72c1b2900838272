"""Templates encrypted at rest: real enrollments on real SQLite with the built models and CelebA faces; the
database file never holds a vector, a wrong key or a swapped row fails authentication, and verify and
identify still work through the decrypting index."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from device.config import DetectorConfig
from device.vision.pipeline import FacePipeline
from server.app import create_app
from server.crypto import ChipCipher, CryptoError
from server.db.models import Template
from server.enrollment.recognition import RecognitionEngine
from server.enrollment.templates import open_template
from tests.face_kit import Faces, embed, pick_faces
from tests.server_support import login, make_config, state_of, stored_bytes

VECTOR_SLICE = 8  # 32 bytes of a vector: far too long to occur by chance in a few hundred kB


@pytest.fixture(scope="module")
def pipeline(built_models: Path) -> Iterator[FacePipeline]:
    with FacePipeline.from_models_dir(built_models, DetectorConfig()) as pipe:
        yield pipe


@pytest.fixture(scope="module")
def faces(shared_dir: Path, pipeline: FacePipeline) -> Faces:
    return pick_faces(shared_dir / "data" / "celeba-faces", pipeline, identities=2, per_identity=3,
                      candidates=40)


@pytest.fixture()
def client(tmp_path: Path, built_models: Path, faces: Faces, db_url: str) -> Iterator[TestClient]:
    config = make_config(tmp_path, db_url, models={"dir": str(built_models)}, recognition={"tau": faces.tau},
                         rate_limit={"per_minute": 6000, "burst": 1000})
    with TestClient(create_app(config, engine=RecognitionEngine.from_config(config),
                               start_mqtt=False)) as test_client:
        yield test_client


def _enroll(client: TestClient, name: str, images: list[bytes]) -> str:
    files = [("images", (f"img{i}.jpg", data, "image/jpeg")) for i, data in enumerate(images)]
    response = client.post("/api/enroll", headers=login(client), files=files,
                           data={"name": name, "consent": "true"})
    assert response.status_code == 201, response.text
    return str(response.json()["person"]["id"])


def _db_bytes(client: TestClient) -> bytes:
    """Everything the database holds on disk (SQLite file and WAL, or PostgreSQL's data files)."""
    return stored_bytes(state_of(client).db)


def _templates(client: TestClient) -> list[Template]:
    with state_of(client).db.session() as session:
        return list(session.scalars(select(Template).order_by(Template.person_id, Template.created_at)))


def _identify(client: TestClient, data: bytes) -> Any:
    return client.post("/api/identify", headers=login(client), data={"top_k": "2"},
                       files={"image": ("probe.jpg", data, "image/jpeg")})


def test_template_vectors_never_reach_the_database_file(client: TestClient, faces: Faces,
                                                        pipeline: FacePipeline) -> None:
    images = faces.of(0)[:2]
    _enroll(client, "Ada", images)
    state = state_of(client)
    raw = _db_bytes(client)
    templates = _templates(client)
    assert len(templates) == 2
    for template, data in zip(templates, images, strict=True):
        vector = open_template(state.cipher, template)
        expected = embed(pipeline, data)
        assert np.allclose(vector, expected / np.linalg.norm(expected), atol=1e-6)
        assert vector.astype(np.float32).tobytes() not in raw
        assert vector[:VECTOR_SLICE].astype(np.float32).tobytes() not in raw
        assert template.ciphertext[30:94] in raw  # the search does look at the right file
        assert template.key_id == state.cipher.key_id.hex()


def test_wrong_key_and_swapped_rows_fail_authentication(client: TestClient, faces: Faces) -> None:
    ada = _enroll(client, "Ada", faces.of(0)[:2])
    bob = _enroll(client, "Bob", faces.of(1)[:2])
    state = state_of(client)
    templates = _templates(client)
    with pytest.raises(CryptoError, match="template was encrypted with another key"):
        open_template(ChipCipher(os.urandom(32)), templates[0])

    first = next(t for t in templates if t.person_id == ada)
    second = next(t for t in templates if t.person_id == bob)
    with state.db.transaction() as session:  # an attacker with write access moves Ada's vector onto Bob
        a, b = session.get(Template, first.id), session.get(Template, second.id)
        assert a is not None and b is not None
        a.ciphertext, b.ciphertext = b.ciphertext, a.ciphertext
    state.index.invalidate()
    for template in (first, second):
        with state.db.session() as session:
            row = session.get(Template, template.id)
            assert row is not None
            with pytest.raises(CryptoError, match="failed authentication"):
                open_template(state.cipher, row)
    with state.db.session() as session, pytest.raises(CryptoError, match="failed authentication"):
        state.index.search(session, state.engine.model_sha256, np.ones(128, np.float32), k=1)

    with state.db.transaction() as session:  # put them back: everything opens again
        a, b = session.get(Template, first.id), session.get(Template, second.id)
        assert a is not None and b is not None
        a.ciphertext, b.ciphertext = b.ciphertext, a.ciphertext
    state.index.invalidate()
    assert _identify(client, faces.of(1)[2]).json()["candidates"][0]["person_id"] == bob


def test_verify_and_identify_use_the_decrypted_templates(client: TestClient, faces: Faces) -> None:
    ada = _enroll(client, "Ada", faces.of(0)[:2])
    bob = _enroll(client, "Bob", faces.of(1)[:2])
    headers = login(client)
    same = client.post("/api/verify", headers=headers, data={"person_id": ada},
                       files={"image": ("probe.jpg", faces.of(0)[2], "image/jpeg")}).json()
    assert same["match"] is True and same["score"] >= faces.tau
    other = client.post("/api/verify", headers=headers, data={"person_id": ada},
                        files={"image": ("probe.jpg", faces.of(1)[2], "image/jpeg")}).json()
    assert other["match"] is False
    found = _identify(client, faces.of(1)[2]).json()
    assert found["match"] is True and [c["person_id"] for c in found["candidates"]] == [bob, ada]
