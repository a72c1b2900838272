"""Style transfer end to end: real SqueezeNet weights from ../shared, VGG19 shapes, the CLI."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from click.testing import CliRunner

from server.style.backbones import BackboneError, SqueezeNetBackbone, make_backbone
from server.style.cli import cli
from server.style.images import read_image, resize_longest
from server.style.params import StyleParams
from server.style.samples import astronaut, mosaic
from server.style.transfer import StyleResult, StyleTransfer, StyleTransferError

SQUEEZENET_H5 = "models/squeezenet/squeezenet_weights_tf_dim_ordering_tf_kernels_notop.h5"
TEST_SIZE = 128
TEST_ITERS = 50


@pytest.fixture(scope="module")
def squeezenet_weights(shared_dir: Path) -> Path:
    path = shared_dir / SQUEEZENET_H5
    if not path.is_file():
        pytest.skip(f"SqueezeNet weights not in ../shared ({path})")
    return path


@pytest.fixture(scope="module")
def transfer(squeezenet_weights: Path) -> StyleTransfer:
    return StyleTransfer(make_backbone("squeezenet", squeezenet_weights))


@pytest.fixture(scope="module")
def images() -> tuple[np.ndarray, np.ndarray]:
    return resize_longest(astronaut(), TEST_SIZE), mosaic(256)


@pytest.fixture(scope="module")
def lbfgs_run(transfer: StyleTransfer, images: tuple[np.ndarray, np.ndarray]) -> StyleResult:
    content, style = images
    params = StyleParams(size=TEST_SIZE, iters=TEST_ITERS, optimizer="lbfgs", strip_every=25)
    return transfer.run(content, style, params)


def test_squeezenet_weights_load_by_name(squeezenet_weights: Path) -> None:
    net = SqueezeNetBackbone(squeezenet_weights)
    model = net.base_model()
    assert model.count_params() == 722_496  # as the shared README says
    assert model(np.zeros((1, 224, 224, 3), np.float32)).shape == (1, 13, 13, 512)
    kernel, bias = model.get_layer("fire2_squeeze1x1").get_weights()
    assert kernel.shape == (1, 1, 64, 16) and bias.shape == (16,)
    assert np.abs(kernel).sum() > 0  # loaded, not the zero/glorot init of an empty layer
    names = net.layer_names()
    assert "fire9_concat" in names and all("/" not in n for n in names)


def test_corrupt_weights_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(BackboneError, match="cannot read SqueezeNet weights"):
        SqueezeNetBackbone(bad).base_model()


def test_content_and_style_costs_vanish_at_their_targets(
    transfer: StyleTransfer, images: tuple[np.ndarray, np.ndarray]
) -> None:
    content, style = images
    style = resize_longest(style, TEST_SIZE)
    params = StyleParams(size=TEST_SIZE)
    at_content = transfer.costs(content, style, content, params)
    at_style = transfer.costs(content, style, style, params)
    assert at_content.content == 0.0 and at_content.style > 0
    assert at_style.style == pytest.approx(0.0, abs=1e-6 * at_content.style) and at_style.content > 0


def test_lbfgs_lowers_j_monotonically(lbfgs_run: StyleResult) -> None:
    totals = [r.total for r in lbfgs_run.history]
    assert len(totals) == TEST_ITERS
    assert all(later <= earlier for earlier, later in itertools.pairwise(totals)), totals
    assert totals[-1] < 0.5 * totals[0]
    assert lbfgs_run.strip is not None and lbfgs_run.strip.shape == (TEST_SIZE, 2 * TEST_SIZE, 3)


def test_stylised_output_halves_the_style_cost(
    transfer: StyleTransfer, images: tuple[np.ndarray, np.ndarray], lbfgs_run: StyleResult
) -> None:
    content, style = images
    params = StyleParams(size=TEST_SIZE)
    before = transfer.costs(content, style, content, params)
    after = transfer.costs(content, style, lbfgs_run.image, params)
    assert lbfgs_run.image.dtype == np.uint8 and lbfgs_run.image.shape == content.shape
    assert after.style <= 0.5 * before.style, (after.style, before.style)


def test_adam_decreases_j_overall(transfer: StyleTransfer, images: tuple[np.ndarray, np.ndarray]) -> None:
    content, style = images
    result = transfer.run(content, style, StyleParams(size=TEST_SIZE, iters=TEST_ITERS, optimizer="adam"))
    totals = [r.total for r in result.history]
    assert len(totals) == TEST_ITERS
    assert min(totals[-5:]) < 0.5 * totals[0]


def test_noise_init_is_seeded_and_cancel_stops(
    transfer: StyleTransfer, images: tuple[np.ndarray, np.ndarray]
) -> None:
    import threading

    content, style = images
    params = StyleParams(size=TEST_SIZE, iters=3, init="noise", seed=5, gamma=1.0)
    first = transfer.run(content, style, params)
    second = transfer.run(content, style, params)
    np.testing.assert_array_equal(first.image, second.image)
    cancel = threading.Event()
    stopped = transfer.run(content, style, params.model_copy(update={"iters": 40}), cancel=cancel,
                           on_iteration=lambda rep: cancel.set() if rep.iteration == 2 else None)
    assert stopped.cancelled and stopped.iterations == 2


def test_unknown_layer_is_a_clear_error(
    transfer: StyleTransfer, images: tuple[np.ndarray, np.ndarray]
) -> None:
    content, style = images
    with pytest.raises(StyleTransferError, match="no layer"):
        transfer.run(content, style, StyleParams(size=TEST_SIZE, iters=1, content_layer="block4_conv2"))


def test_vgg19_random_weights_shapes() -> None:
    net = make_backbone("vgg19", random_weights=True)
    outs = net.extractor([net.default_content_layer, *net.default_style_layers])(np.zeros((1, 64, 64, 3)))
    assert [tuple(o.shape[1:]) for o in outs] == [
        (8, 8, 512), (64, 64, 64), (32, 32, 128), (16, 16, 256), (8, 8, 512), (4, 4, 512)
    ]
    result = StyleTransfer(net).run(np.zeros((48, 48, 3), np.uint8), np.full((48, 48, 3), 200, np.uint8),
                                    StyleParams(size=48, iters=2))
    assert result.image.shape == (48, 48, 3) and result.iterations <= 2


def test_cli_run_writes_png_and_strip(tmp_path: Path, squeezenet_weights: Path) -> None:
    runner = CliRunner()
    samples = runner.invoke(cli, ["samples", str(tmp_path)])
    assert samples.exit_code == 0, samples.output
    out = tmp_path / "out.png"
    result = runner.invoke(cli, [
        "run", str(tmp_path / "astronaut.png"), str(tmp_path / "mosaic.png"), "-o", str(out),
        "--weights", str(squeezenet_weights), "--size", "64", "--iters", "4", "--strip-every", "2",
        "--style-layers", "fire2_concat,fire3_concat", "--style-weights", "1e-4,1e-4",
    ])
    assert result.exit_code == 0, result.output
    assert read_image(out).shape == (64, 64, 3)
    assert read_image(out.with_suffix(".strip.png")).shape == (64, 128, 3)


def test_cli_refuses_missing_weights_and_non_images(tmp_path: Path) -> None:
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"hello")
    runner = CliRunner()
    no_weights = runner.invoke(cli, ["run", str(junk), str(junk), "-o", str(tmp_path / "o.png")],
                               env={"FACEGATE_STYLE_WEIGHTS": ""})
    assert no_weights.exit_code != 0 and "weights" in no_weights.output
    not_image = runner.invoke(cli, ["run", str(junk), str(junk), "-o", str(tmp_path / "o.png"),
                                    "--random-weights"])
    assert not_image.exit_code != 0 and "not a readable image" in not_image.output
