"""Feature-extractor backbones for style transfer, by name: VGG19 (the paper's) and SqueezeNet v1.1.

Both use Caffe-style preprocessing: RGB (0-255) -> BGR, minus the ImageNet channel means, no scaling.
Weights always come from a file; the Keras download for VGG19 happens only when explicitly allowed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

logger = logging.getLogger(__name__)

# ImageNet channel means in BGR order on the 0-255 scale (keras "caffe" mode, Simonyan & Zisserman).
CAFFE_MEANS_BGR = np.array([103.939, 116.779, 123.68], dtype=np.float32)

FloatArray = npt.NDArray[np.float32]
ByteImage = npt.NDArray[np.uint8]


class BackboneError(Exception):
    """A backbone cannot be built: unknown name, missing/corrupt weights, unknown layer."""


class Backbone:
    """Base class: a Keras feature extractor plus its pre/de-processing and default layers."""

    name: ClassVar[str]
    default_content_layer: ClassVar[str]
    default_style_layers: ClassVar[tuple[str, ...]]
    # Lambdas for the default style layers; None = equal weights summing to 1.
    default_style_weights: ClassVar[tuple[float, ...] | None] = None

    def __init__(self, weights: Path | None = None, *, random_weights: bool = False,
                 allow_download: bool = False) -> None:
        if weights is None and not random_weights and not allow_download:
            raise BackboneError(
                f"backbone {self.name!r} needs a weights file (--weights PATH); "
                "pass random_weights=True only for shape/timing checks"
            )
        if weights is not None and not Path(weights).is_file():
            raise BackboneError(f"weights file for {self.name!r} not found: {weights}")
        self.weights = Path(weights) if weights is not None else None
        self.random_weights = weights is None and random_weights and not allow_download
        self.allow_download = allow_download
        self._base: Any = None
        self._extractors: dict[tuple[str, ...], Any] = {}

    # -- pixels ---------------------------------------------------------------------------------
    def preprocess(self, rgb: npt.NDArray[Any]) -> FloatArray:
        """RGB (H, W, 3) on 0-255 -> (1, H, W, 3) float32 BGR minus the ImageNet means."""
        arr = np.asarray(rgb, dtype=np.float32)
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) RGB image, got shape {arr.shape}")
        return (arr[:, :, ::-1] - CAFFE_MEANS_BGR)[None, ...].astype(np.float32)

    def deprocess(self, x: npt.NDArray[Any]) -> ByteImage:
        """(1, H, W, 3) or (H, W, 3) preprocessed -> RGB uint8, clipped to valid pixels."""
        arr = np.asarray(x, dtype=np.float32)
        if arr.ndim == 4:
            arr = arr[0]
        rgb = (arr + CAFFE_MEANS_BGR)[:, :, ::-1]
        out: ByteImage = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
        return out

    def pixel_bounds(self) -> tuple[FloatArray, FloatArray]:
        """Per-channel (low, high) of valid preprocessed values, shape (3,) each (BGR order)."""
        return (-CAFFE_MEANS_BGR).astype(np.float32), (255.0 - CAFFE_MEANS_BGR).astype(np.float32)

    # -- networks -------------------------------------------------------------------------------
    def base_model(self) -> Any:
        """The whole Keras backbone (built once)."""
        if self._base is None:
            self._base = self._build()
        return self._base

    def layer_names(self) -> list[str]:
        """Names of every layer that can be used as a content or style layer."""
        return [layer.name for layer in self.base_model().layers if not layer.name.startswith("input")]

    def extractor(self, layers: Sequence[str]) -> Any:
        """A Keras model mapping a preprocessed image to the outputs of ``layers`` (list, in order)."""
        key = tuple(layers)
        if key not in self._extractors:
            import keras

            base = self.base_model()
            known = {layer.name for layer in base.layers}
            unknown = [name for name in key if name not in known]
            if unknown:
                raise BackboneError(
                    f"{self.name} has no layer(s) {unknown}; choose from: {', '.join(self.layer_names())}"
                )
            outputs = [base.get_layer(name).output for name in key]
            # Keras prunes the graph to what the outputs need, so deep unused layers cost nothing.
            self._extractors[key] = keras.Model(base.input, outputs, name=f"{self.name}_features")
        return self._extractors[key]

    def _build(self) -> Any:
        raise NotImplementedError


class Vgg19Backbone(Backbone):
    """VGG19 without its classifier (Keras applications); the reference network of Gatys et al."""

    name = "vgg19"
    default_content_layer = "block4_conv2"
    default_style_layers = ("block1_conv1", "block2_conv1", "block3_conv1", "block4_conv1", "block5_conv1")

    def _build(self) -> Any:
        import keras

        if self.weights is not None:
            source: str | None = str(self.weights)
        elif self.allow_download:
            source = "imagenet"  # the standard Keras download, only when the caller allowed it
        else:
            source = None
            logger.warning("vgg19 with random weights: only shapes and timing are meaningful")
        try:
            model = keras.applications.VGG19(include_top=False, weights=source, input_shape=(None, None, 3))
        except (OSError, ValueError) as exc:
            raise BackboneError(f"cannot load VGG19 weights from {source}: {exc}") from exc
        model.trainable = False
        return model


class SqueezeNetBackbone(Backbone):
    """SqueezeNet v1.1 (Iandola et al. 2016) rebuilt in Keras; weights read layer by layer with h5py.

    Layer names follow the Caffe/Keras-1 file with '/' replaced by '_' (``fire2/squeeze1x1`` ->
    ``fire2_squeeze1x1``), because Keras 3 forbids '/' in names.
    """

    name = "squeezenet"
    default_content_layer = "fire5_concat"
    default_style_layers = ("relu_conv1", "fire2_concat", "fire3_concat", "fire5_concat", "fire7_concat")
    # Per-layer style costs differ by ~30x on SqueezeNet (they scale with activation^4), so the default
    # lambdas are ~1/J_l(C, S) measured on astronaut vs a mosaic at 256 px: each layer then pulls about
    # equally, and with alpha=10, beta=40 the weighted style and content terms end within ~3x of each other.
    default_style_weights = (1e-3, 6e-5, 5e-5, 2.5e-4, 1.7e-3)
    # (fire index, squeeze filters, expand filters per branch), v1.1 layout; pools follow fire3 and fire5.
    FIRES: ClassVar[tuple[tuple[int, int, int], ...]] = (
        (2, 16, 64), (3, 16, 64), (4, 32, 128), (5, 32, 128),
        (6, 48, 192), (7, 48, 192), (8, 64, 256), (9, 64, 256),
    )
    POOL_AFTER: ClassVar[frozenset[int]] = frozenset({3, 5})

    def _build(self) -> Any:
        import keras
        from keras import layers

        inputs = keras.Input(shape=(None, None, 3), name="input_1")
        x = layers.Conv2D(64, 3, strides=2, padding="valid", name="conv1")(inputs)
        x = layers.ReLU(name="relu_conv1")(x)
        x = layers.MaxPooling2D(3, strides=2, padding="valid", name="pool1")(x)
        for index, squeeze, expand in self.FIRES:
            x = self._fire(x, index, squeeze, expand)
            if index in self.POOL_AFTER:
                x = layers.MaxPooling2D(3, strides=2, padding="valid", name=f"pool{index}")(x)
        model = keras.Model(inputs, x, name="squeezenet_v1_1")
        model.trainable = False
        if self.weights is not None:
            self._load_h5(model, self.weights)
        else:
            logger.warning("squeezenet with random weights: only shapes and timing are meaningful")
        return model

    @staticmethod
    def _fire(x: Any, index: int, squeeze: int, expand: int) -> Any:
        from keras import layers

        prefix = f"fire{index}_"
        s = layers.Conv2D(squeeze, 1, padding="valid", name=prefix + "squeeze1x1")(x)
        s = layers.ReLU(name=prefix + "relu_squeeze1x1")(s)
        e1 = layers.Conv2D(expand, 1, padding="valid", name=prefix + "expand1x1")(s)
        e1 = layers.ReLU(name=prefix + "relu_expand1x1")(e1)
        e3 = layers.Conv2D(expand, 3, padding="same", name=prefix + "expand3x3")(s)
        e3 = layers.ReLU(name=prefix + "relu_expand3x3")(e3)
        return layers.Concatenate(axis=-1, name=prefix + "concat")([e1, e3])

    @staticmethod
    def _load_h5(model: Any, path: Path) -> None:
        """Copy each conv layer's [kernel, bias] from the Keras-1 HDF5 file, matched by name."""
        import h5py

        try:
            with h5py.File(path, "r") as h5:
                names = [n.decode() if isinstance(n, bytes) else str(n) for n in h5.attrs["layer_names"]]
                loaded = 0
                for h5_name in names:
                    group = h5[h5_name]
                    weight_names = [w.decode() if isinstance(w, bytes) else str(w)
                                    for w in group.attrs.get("weight_names", [])]
                    if not weight_names:
                        continue
                    layer = model.get_layer(h5_name.replace("/", "_"))
                    arrays = [np.asarray(group[w], dtype=np.float32) for w in weight_names]
                    expected = [tuple(v.shape) for v in layer.weights]
                    if [a.shape for a in arrays] != expected:
                        got = [a.shape for a in arrays]
                        raise BackboneError(f"{path}: layer {h5_name} has shapes {got}, expected {expected}")
                    layer.set_weights(arrays)
                    loaded += 1
        except (OSError, KeyError, ValueError) as exc:
            raise BackboneError(f"cannot read SqueezeNet weights from {path}: {exc}") from exc
        conv_layers = sum(1 for layer in model.layers if layer.weights)
        if loaded != conv_layers:
            raise BackboneError(f"{path}: loaded {loaded} of {conv_layers} convolution layers")
        logger.info("squeezenet: loaded %d layers from %s", loaded, path.name)


BACKBONES: dict[str, type[Backbone]] = {
    Vgg19Backbone.name: Vgg19Backbone,
    SqueezeNetBackbone.name: SqueezeNetBackbone,
}


def make_backbone(name: str, weights: Path | None = None, *, random_weights: bool = False,
                  allow_download: bool = False) -> Backbone:
    """Build the backbone registered under ``name``."""
    try:
        cls = BACKBONES[name]
    except KeyError:
        raise BackboneError(f"unknown backbone {name!r}; choose from {sorted(BACKBONES)}") from None
    return cls(weights, random_weights=random_weights, allow_download=allow_download)
