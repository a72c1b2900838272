"""FAISS gallery: identity-level search, deltas in place, atomic persistence, model pinning, HNSW switch."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from core import files as gallery_store  # the atomic write the gallery saves through
from device.config import GalleryConfig
from device.gallery import (
    NO_RUNNER_UP,
    Gallery,
    GalleryCorruptError,
    GalleryIndexError,
    GalleryModelMismatch,
    GalleryNotFoundError,
    IndexKind,
)

DIM = 128
SHA = "a" * 64
OTHER_SHA = "b" * 64


def unit(rng: np.random.Generator, n: int = 1) -> np.ndarray:
    """Random unit vectors."""
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def near(v: np.ndarray, rng: np.random.Generator, noise: float = 0.05) -> np.ndarray:
    """A unit vector close to v (another photo of the same person)."""
    x = v + noise * rng.standard_normal(v.shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture()
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


@pytest.mark.parametrize("rule", ["max", "mean"])
def test_identity_score_follows_the_rule_and_runner_up_is_another_identity(
        tmp_path: Path, rng: np.random.Generator, rule: str) -> None:
    alice, bob = unit(rng, 3), unit(rng, 1)
    g = Gallery.create(tmp_path, DIM, SHA, GalleryConfig(top_k=2, identity_score=rule))  # type: ignore[arg-type]
    g.add_person("alice", "Alice", alice)
    g.add_person("bob", "Bob", bob)
    probe = near(alice[1], rng, 0.01)
    match = g.search(probe)
    assert match.person_id == "alice" and match.name == "Alice"
    mean = alice.mean(axis=0) / np.linalg.norm(alice.mean(axis=0))
    expected = float(np.max(alice @ probe)) if rule == "max" else float(mean @ probe)
    assert match.score == pytest.approx(expected, abs=1e-5)
    # top_k=2 holds only Alice's templates: the gallery widens k to find Bob as runner-up
    assert match.runner_up_score == pytest.approx(float(bob[0] @ probe), abs=1e-5)
    assert match.margin == pytest.approx(match.score - match.runner_up_score)
    # a new template changes the mean; removing the person forgets it
    g.add_person("alice", "Alice", near(alice[0], rng, 0.01))
    grown = g.search(probe)
    assert (grown.score == pytest.approx(match.score, abs=1e-5)) is (rule == "max")
    g.remove_person("alice")
    assert g.search(probe).person_id == "bob"


def test_templates_that_cancel_out_fall_back_to_the_best_template(tmp_path: Path,
                                                                  rng: np.random.Generator) -> None:
    v = unit(rng, 1)
    g = Gallery.create(tmp_path, DIM, SHA, GalleryConfig(identity_score="mean"))
    g.add_person("odd", "Odd", np.concatenate([v, -v]))
    g.add_person("other", "Other", unit(rng, 1))
    match = g.search(v[0])
    assert match.person_id == "odd" and match.score == pytest.approx(1.0, abs=1e-5)


def test_single_person_has_no_runner_up_and_empty_gallery_matches_nobody(tmp_path: Path,
                                                                        rng: np.random.Generator) -> None:
    g = Gallery.create(tmp_path, DIM, SHA, GalleryConfig())
    assert g.search(unit(rng)[0]).person_id is None
    g.add_person("p", "P", unit(rng, 2))
    match = g.search(unit(rng)[0])
    assert match.person_id == "p" and match.runner_up_score == NO_RUNNER_UP


def test_add_remove_in_place_and_revision_bumps(tmp_path: Path, rng: np.random.Generator) -> None:
    g = Gallery.create(tmp_path, DIM, SHA, GalleryConfig())
    a, b = unit(rng, 2), unit(rng, 2)
    g.add_person("a", "A", a)
    g.add_person("b", "B", b)
    rev = g.revision
    assert g.remove_person("a") == 2
    assert g.revision == rev + 1 and "a" not in g and g.template_count == 2
    assert g.search(a[0]).person_id == "b"
    assert g.remove_person("nobody") == 0
    # extra templates for an existing person, renamed
    g.add_person("b", "Bee", unit(rng, 1))
    assert g.templates_of("b") and len(g.templates_of("b")) == 3 and g.persons()["b"] == "Bee"


def test_persist_roundtrip_and_version(tmp_path: Path, rng: np.random.Generator) -> None:
    g = Gallery.create(tmp_path, DIM, SHA, GalleryConfig(), model_version="dlib-int8-1")
    vecs = {pid: unit(rng, 2) for pid in ("x", "y", "z")}
    for pid, v in vecs.items():
        g.add_person(pid, pid.upper(), v)
    g.remove_person("y")
    version = g.save()
    assert version == g.version
    with Gallery.open(tmp_path, SHA, GalleryConfig()) as loaded:
        assert loaded.version == version and loaded.persons() == {"x": "X", "z": "Z"}
        assert loaded.search(vecs["z"][1]).person_id == "z"
        assert loaded.model_version == "dlib-int8-1"
        loaded.add_person("w", "W", unit(rng))
        assert loaded.revision == g.revision + 1
    meta = json.loads((tmp_path / "gallery.json").read_text())
    assert meta["model_sha256"] == SHA and meta["index"]["kind"] == "flat"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gallery.json", meta["vectors_file"]]


def test_content_hash_ignores_local_template_ids(tmp_path: Path, rng: np.random.Generator) -> None:
    a, b = unit(rng, 2), unit(rng, 1)
    g1 = Gallery.create(tmp_path / "1", DIM, SHA, GalleryConfig())
    g1.add_person("tmp", "T", unit(rng))
    g1.remove_person("tmp")  # consumes template ids
    g1.add_person("a", "A", a)
    g1.add_person("b", "B", b)
    g2 = Gallery.create(tmp_path / "2", DIM, SHA, GalleryConfig())
    g2.add_person("b", "B", b)
    g2.add_person("a", "A", a)
    assert g1.content_sha256() == g2.content_sha256()
    g2.add_person("a", "A", unit(rng))
    assert g1.content_sha256() != g2.content_sha256()


def test_load_refuses_a_gallery_for_another_model(tmp_path: Path, rng: np.random.Generator) -> None:
    g = Gallery.create(tmp_path, DIM, SHA, GalleryConfig())
    g.add_person("a", "A", unit(rng))
    g.save()
    with pytest.raises(GalleryModelMismatch, match="re-embed") as info:
        Gallery.open(tmp_path, OTHER_SHA, GalleryConfig())
    assert info.value.gallery_sha256 == SHA and info.value.model_sha256 == OTHER_SHA
    with pytest.raises(GalleryNotFoundError):
        Gallery.open(tmp_path / "none", SHA, GalleryConfig())


def test_corrupt_vectors_are_detected(tmp_path: Path, rng: np.random.Generator) -> None:
    g = Gallery.create(tmp_path, DIM, SHA, GalleryConfig())
    g.add_person("a", "A", unit(rng))
    g.save()
    vectors = next(tmp_path.glob("vectors-*.npy"))
    data = bytearray(vectors.read_bytes())
    data[-1] ^= 0xFF
    vectors.write_bytes(bytes(data))
    with pytest.raises(GalleryCorruptError, match="sha256"):
        Gallery.open(tmp_path, SHA, GalleryConfig())


def test_failed_save_leaves_the_previous_gallery(tmp_path: Path, rng: np.random.Generator,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    g = Gallery.create(tmp_path, DIM, SHA, GalleryConfig())
    g.add_person("a", "A", unit(rng))
    old_version = g.save()
    g.add_person("b", "B", unit(rng))

    real_replace = os.replace

    def power_cut(src: str, dst: str) -> None:
        if str(dst).endswith("gallery.json"):
            raise OSError("simulated power cut before the commit rename")
        real_replace(src, dst)

    monkeypatch.setattr(gallery_store.os, "replace", power_cut)
    with pytest.raises(OSError, match="power cut"):
        g.save()
    monkeypatch.undo()
    assert not list(tmp_path.glob(".*.tmp")), "temp files are cleaned up"
    with Gallery.open(tmp_path, SHA, GalleryConfig()) as loaded:
        assert loaded.version == old_version and loaded.persons() == {"a": "A"}


def test_switches_to_hnsw_above_exact_max_with_tombstones_and_persisted_graph(
        tmp_path: Path, rng: np.random.Generator) -> None:
    cfg = GalleryConfig(exact_max=40, approximate="hnsw", hnsw_m=16, hnsw_ef_search=64,
                        hnsw_ef_construction=64)
    g = Gallery.create(tmp_path, DIM, SHA, cfg)
    people = {f"p{i}": unit(rng, 2) for i in range(30)}
    g.add_many([(pid, pid, v) for pid, v in list(people.items())[:15]])
    assert g.params.kind is IndexKind.FLAT
    g.add_many([(pid, pid, v) for pid, v in list(people.items())[15:]])
    assert g.params.kind is IndexKind.HNSW and g.params.hnsw_m == 16
    assert all(g.search(near(v[0], rng, 0.01)).person_id == pid for pid, v in people.items())
    g.remove_person("p3")  # one tombstone: filtered at search time
    assert g.search(people["p3"][0]).person_id != "p3"
    version = g.save()
    meta = json.loads((tmp_path / "gallery.json").read_text())
    assert meta["index"]["kind"] == "hnsw" and meta["index"]["hnsw_m"] == 16
    assert meta["index"]["ef_construction"] == 64 and meta["index"]["ef_search"] == 64
    assert meta["index_file"] and len(meta["tombstones"]) == 2
    with Gallery.open(tmp_path, SHA, cfg) as loaded:
        assert loaded.version == version and loaded.params.kind is IndexKind.HNSW
        assert loaded.search(people["p3"][0]).person_id != "p3"
        assert loaded.search(people["p7"][1]).person_id == "p7"
        # many removals: compaction rebuilds, and below exact_max/2 it goes back to exact search
        for i in range(4, 25):
            loaded.remove_person(f"p{i}")
        assert loaded.params.kind is IndexKind.FLAT
        assert loaded.search(people["p27"][0]).person_id == "p27"


def test_bad_vectors_are_refused(tmp_path: Path) -> None:
    g = Gallery.create(tmp_path, DIM, SHA, GalleryConfig())
    with pytest.raises(GalleryIndexError, match="dimension"):
        g.add_person("a", "A", np.ones((1, 64), np.float32))
    with pytest.raises(GalleryIndexError, match="NaN"):
        g.add_person("a", "A", np.full((1, DIM), np.nan, np.float32))
    with pytest.raises(GalleryIndexError, match="zero"):
        g.search(np.zeros(DIM, np.float32))
    g.close()
    g.close()


def test_ivf_above_exact_max_removes_in_place_persists_and_retrains_on_growth(
        tmp_path: Path, rng: np.random.Generator) -> None:
    cfg = GalleryConfig(exact_max=100, approximate="ivf", ivf_nprobe=64)
    g = Gallery.create(tmp_path, DIM, SHA, cfg)
    people = {f"p{i}": unit(rng, 2) for i in range(200)}
    g.add_many([(pid, pid, v) for pid, v in people.items()])
    params = g.params
    assert params.kind is IndexKind.IVF and params.trained_on == 400 and 1 <= params.nlist <= 400 // 39
    assert all(g.search(near(v[1], rng, 0.01)).person_id == pid for pid, v in people.items())
    for gone in ("p5", "p17", "p100"):
        g.remove_person(gone)
    assert g.search(people["p5"][0]).person_id != "p5"
    # ids survive in-place removal (IVF does not renumber; every remaining template is still its owner's)
    removed = {"p5", "p17", "p100"}
    assert all(g.search(v[1]).person_id == pid for pid, v in people.items() if pid not in removed)
    version = g.save()
    meta = json.loads((tmp_path / "gallery.json").read_text())
    assert meta["index"]["kind"] == "ivf" and meta["index"]["nlist"] == params.nlist
    assert meta["index_file"] and meta["tombstones"] == []
    with Gallery.open(tmp_path, SHA, cfg) as loaded:
        assert loaded.version == version and loaded.params.kind is IndexKind.IVF
        assert loaded.search(people["p9"][0]).person_id == "p9"
        assert loaded.remove_person("p9") == 2  # the restored IVF still removes in place
        assert loaded.search(people["p9"][0]).person_id != "p9"
        assert loaded.search(people["p10"][0]).person_id == "p10"
        more = {f"q{i}": unit(rng, 2) for i in range(700)}
        loaded.add_many([(pid, pid, v) for pid, v in more.items()])
        assert loaded.params.trained_on == loaded.template_count  # grew > 4x: retrained
        assert loaded.search(more["q3"][1]).person_id == "q3"


def test_flat_removal_keeps_every_other_template_id(tmp_path: Path, rng: np.random.Generator) -> None:
    g = Gallery.create(tmp_path, DIM, SHA, GalleryConfig())
    people = {f"p{i}": unit(rng, 2) for i in range(30)}
    g.add_many([(pid, pid, v) for pid, v in people.items()])
    for gone in ("p0", "p7", "p8", "p29"):
        g.remove_person(gone)
    g.add_person("new", "New", unit(rng, 1))
    kept = {pid: v for pid, v in people.items() if pid not in {"p0", "p7", "p8", "p29"}}
    assert all(g.search(v[0]).person_id == pid and g.search(v[1]).person_id == pid for pid, v in kept.items())
