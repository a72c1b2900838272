"""The real promotion hooks in a running server: enroll CelebA faces through the API, promote registry
versions whose artifacts are the project's built TFLite embedders, and check the re-embedded, encrypted
templates, identify with them, the signed bundle and its gallery, idempotent batches, and a rollback that
re-points without re-embedding. No training: the built float32 embedder stands in for a retrained
candidate (another file, another sha256, same chip input)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from sqlalchemy import delete, func, select

from core.protocol.schemas import manifest_bytes
from device.bundles.signing import load_public_key, verify
from device.config import DetectorConfig, GalleryConfig
from device.gallery import Gallery
from device.vision.embedder import Embedder
from device.vision.pipeline import FacePipeline
from models.runtime.manifest import load_manifest
from server.app import create_app
from server.bundles.builder import load_bundle
from server.bundles.cli import cli as bundle_cli
from server.bundles.gallery_bundle import EXPORT_PREFIX
from server.bundles.signing import generate_key
from server.db.models import Chip, Template
from server.enrollment.recognition import RecognitionEngine
from server.enrollment.reembed import open_chip, reembed_gallery
from server.enrollment.templates import open_template
from server.registry import gate
from server.registry.model_folder import version_models_dir
from server.registry.registry import ModelRegistry, Status
from server.state import AppState, site_keyring
from tests.bundle_kit import opened_gallery
from tests.face_kit import Faces, pick_faces
from tests.server_support import login, make_config, state_of

PERSONS = 3
ENROLL_IMAGES = 2


@pytest.fixture(scope="module")
def faces(shared_dir: Path, built_models: Path) -> Faces:
    with FacePipeline.from_models_dir(built_models, DetectorConfig()) as pipeline:
        return pick_faces(shared_dir / "data" / "celeba-faces", pipeline, identities=PERSONS,
                          per_identity=ENROLL_IMAGES + 1, candidates=40)


@pytest.fixture()
def client(tmp_path: Path, built_models: Path, faces: Faces) -> Iterator[TestClient]:
    config = make_config(tmp_path, models={"dir": str(built_models)}, recognition={"tau": faces.tau},
                         rate_limit={"per_minute": 6000, "burst": 1000})
    generate_key(config.signing_key_path)
    with TestClient(create_app(config, engine=RecognitionEngine.from_config(config),
                               start_mqtt=False)) as test_client:
        yield test_client


def _metrics(tar: float) -> dict[str, Any]:
    report = {"pairs": 1200, "auc": 0.99, "eer": 0.05, "tar_at_far": {"0.01": tar + 0.1, "0.001": tar}}
    return {"heldout": {"folds": [9, 10], "trained_on": "external"}, "float": report, "int8": report,
            "parity": {"mean_cosine": 0.999}}


def _versions(registry: ModelRegistry, models: Path) -> tuple[str, str]:
    """The built dlib embedder as the baseline, and the float32 export standing in for a new candidate."""
    manifest = load_manifest(models)
    int8, fp32 = manifest.get("embedder-int8"), manifest.get("embedder-float32")
    baseline = registry.register("embedder", hyperparams={}, metrics=_metrics(0.80), artifacts={
        "int8": str(models / int8.file), "int8_sha256": int8.sha256,
        "float32": str(models / fp32.file), "float32_sha256": fp32.sha256})
    candidate = registry.register("embedder", hyperparams={}, metrics=_metrics(0.81), parent=baseline.version,
                                  artifacts={"int8": str(models / fp32.file), "int8_sha256": fp32.sha256})
    return baseline.version, candidate.version


def _enroll_all(client: TestClient, faces: Faces) -> list[str]:
    ids = []
    for i in range(PERSONS):
        files = [("images", (f"img{j}.jpg", data, "image/jpeg"))
                 for j, data in enumerate(faces.of(i)[:ENROLL_IMAGES])]
        response = client.post("/api/enroll", headers=login(client), files=files,
                               data={"name": f"Person {i}", "consent": "true"})
        assert response.status_code == 201, response.text
        ids.append(str(response.json()["person"]["id"]))
    return ids


def _identify(client: TestClient, data: bytes) -> Any:
    response = client.post("/api/identify", headers=login(client),
                           files={"image": ("probe.jpg", data, "image/jpeg")})
    assert response.status_code == 200, response.text
    return response.json()


def _templates(state: AppState) -> dict[str, list[Template]]:
    """Templates by model sha256."""
    by_model: dict[str, list[Template]] = {}
    with state.db.session() as session:
        for template in session.scalars(select(Template)):
            by_model.setdefault(template.model_sha256, []).append(template)
    return by_model


def _check_bundle(state: AppState, path: Path, sha: str, persons: dict[str, str]) -> None:
    """Signed with the server key, embedder and gallery of ``sha`` (sealed), holding exactly ``persons``."""
    bundle = load_bundle(path)
    manifest = bundle.manifest
    public = load_public_key(state.config.signing_key_path.with_name("bundle.key.pub").read_text())
    verify(public, bundle.announce.signature, manifest_bytes(manifest), "bundle")
    assert manifest.embedder_sha256 == manifest.gallery_model_sha256 == sha
    assert load_manifest(path / "models").get("embedder-int8").sha256 == sha
    assert manifest.gallery_key_version is not None  # sealed by default: open it as a door would
    keyring = site_keyring(state.config, state.cipher)
    assert keyring is not None
    key = keyring.key(manifest.gallery_key_version)
    assert key is not None
    opened = opened_gallery(path, key, state.config.data_dir / f"opened-{manifest.sequence}")
    with Gallery.open(opened, sha, GalleryConfig()) as gallery:
        assert gallery.persons() == persons
        assert gallery.template_count == PERSONS * ENROLL_IMAGES


def test_promotion_reembeds_bundles_and_rollback_repoints(client: TestClient, faces: Faces,
                                                          built_models: Path) -> None:
    state = state_of(client)
    ids = _enroll_all(client, faces)
    names = {pid: f"Person {i}" for i, pid in enumerate(ids)}
    base_sha = state.engine.model_sha256
    registry = ModelRegistry(state.db)
    baseline, candidate = _versions(registry, built_models)

    # The baseline is what enrolled the faces: nothing to re-embed, but its bundle is built.
    gate.promote(registry, baseline, hooks=state.promotion_hooks)
    assert set(_templates(state)) == {base_sha}
    first = state.config.bundles_root / "1"
    _check_bundle(state, first, base_sha, names)

    gate.promote(registry, candidate, hooks=state.promotion_hooks)
    new_sha = load_manifest(version_models_dir(state.config, candidate)).get("embedder-int8").sha256
    assert new_sha != base_sha and registry.current().version == candidate
    by_model = _templates(state)
    with state.db.session() as session:
        chips = set(session.scalars(select(Chip.id)))
    assert len(chips) == PERSONS * ENROLL_IMAGES
    assert {t.chip_id for t in by_model[new_sha]} == chips  # one new template per chip
    entry = load_manifest(version_models_dir(state.config, candidate)).get("embedder-int8")
    with Embedder.from_entry(version_models_dir(state.config, candidate), entry) as embedder:
        for template in by_model[new_sha]:  # encrypted, bound to the new model, and really its vectors
            assert template.key_id == state.cipher.key_id.hex()
            with state.db.session() as session:
                chip = session.get(Chip, template.chip_id)
                assert chip is not None
                expected = embedder.vector(open_chip(state.cipher, chip))
            assert np.allclose(open_template(state.cipher, template), expected, atol=1e-6)
    kept = {t.id for t in by_model[base_sha]}
    assert len(kept) == PERSONS * ENROLL_IMAGES  # the old model's templates are retained

    assert state.engine.model_sha256 == new_sha  # the server now runs the promoted embedder
    for i, pid in enumerate(ids):
        found = _identify(client, faces.of(i)[ENROLL_IMAGES])
        assert found["model_sha256"] == new_sha
        assert found["match"] is True and found["candidates"][0]["person_id"] == pid
    second = state.config.bundles_root / "2"
    _check_bundle(state, second, new_sha, names)
    assert not list(state.config.bundles_root.glob(f"{EXPORT_PREFIX}*"))  # the plain export is gone
    restarted = AppState.build(state.config)  # a server started later runs the promoted embedder too
    try:
        assert restarted.engine.model_sha256 == new_sha
    finally:
        restarted.close()

    withdrawn, restored = gate.rollback(registry, hooks=state.promotion_hooks)
    assert (withdrawn.version, restored.version) == (candidate, baseline)
    after = _templates(state)
    assert {t.id for t in after[base_sha]} == kept  # re-pointed at the kept templates, nothing re-embedded
    assert {t.id for t in after[new_sha]} == {t.id for t in by_model[new_sha]}
    assert state.engine.model_sha256 == base_sha
    assert _identify(client, faces.of(0)[ENROLL_IMAGES])["candidates"][0]["person_id"] == ids[0]
    _check_bundle(state, state.config.bundles_root / "3", base_sha, names)


def test_reembedding_is_idempotent_in_batches(client: TestClient, faces: Faces, built_models: Path) -> None:
    state = state_of(client)
    _enroll_all(client, faces)
    entry = load_manifest(built_models).get("embedder-float32")
    with Embedder.from_entry(built_models, entry) as embedder:
        first = reembed_gallery(state.db, state.cipher, embedder, batch_size=2)
        assert (first.chips, first.embedded, first.skipped) == (6, 6, 0)
        with state.db.transaction() as session:  # as if the run had died after a few batches
            victims = list(session.scalars(select(Template.id).where(Template.model_sha256 == entry.sha256)
                                           .order_by(Template.id).limit(3)))
            session.execute(delete(Template).where(Template.id.in_(victims)))
        again = reembed_gallery(state.db, state.cipher, embedder, batch_size=2)
        assert (again.embedded, again.skipped) == (3, 3)
        assert reembed_gallery(state.db, state.cipher, embedder).embedded == 0
    with state.db.session() as session:
        count = session.scalar(select(func.count()).select_from(Template)
                               .where(Template.model_sha256 == entry.sha256))
    assert count == PERSONS * ENROLL_IMAGES


def test_a_failing_hook_undoes_the_promotion_and_nothing_is_bundled(client: TestClient, faces: Faces,
                                                                   built_models: Path) -> None:
    state = state_of(client)
    _enroll_all(client, faces)
    registry = ModelRegistry(state.db)
    baseline, candidate = _versions(registry, built_models)
    gate.promote(registry, baseline, hooks=state.promotion_hooks)
    state.config.signing_key_path.unlink()  # the bundle cannot be signed now
    with pytest.raises(gate.PromotionHookError, match=r"build-bundle.*does not exist"):
        gate.promote(registry, candidate, hooks=state.promotion_hooks)
    assert registry.current().version == baseline
    assert registry.get(candidate).status == Status.CANDIDATE
    assert not (state.config.bundles_root / "2").exists()
    assert state.engine.model_sha256 != load_manifest(
        version_models_dir(state.config, candidate)).get("embedder-int8").sha256


def test_bundle_build_cli_exports_the_enrolled_gallery(client: TestClient, faces: Faces, built_models: Path,
                                                       tmp_path: Path) -> None:
    """`facegate bundle build` without --gallery bundles every enrolled person for the running embedder."""
    state = state_of(client)
    ids = _enroll_all(client, faces)
    config_file = tmp_path / "server.toml"
    config_file.write_text(f'data_dir = "{state.config.data_dir}"\n[models]\ndir = "{built_models}"\n'
                           f'[mqtt]\nenabled = false\nsite = "{state.config.mqtt.site}"\n', encoding="utf-8")
    result = CliRunner().invoke(bundle_cli, ["build", "--config", str(config_file), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["persons"] == PERSONS and summary["templates"] == PERSONS * ENROLL_IMAGES
    _check_bundle(state, Path(summary["path"]), state.engine.model_sha256,
                  {pid: f"Person {i}" for i, pid in enumerate(ids)})
    assert not list(state.config.bundles_root.glob(f"{EXPORT_PREFIX}*"))  # the plain export is gone
    refused = CliRunner().invoke(bundle_cli, ["build", "--config", str(config_file), "--embedder", "x"])
    assert refused.exit_code == 2 and "--embedder goes with --gallery" in refused.output
