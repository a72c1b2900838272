"""The Gatys optimisation loop: G starts from content+noise (or noise) and follows TF gradients of J(G).

L-BFGS is a box-projected NumPy loop (``server.style.lbfgs``): every accepted iterate is a valid image
and J never rises. Adam is a small NumPy loop with clipping, so J may wiggle.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from server.style.backbones import Backbone, BackboneError, ByteImage, FloatArray
from server.style.images import make_strip, resize_to
from server.style.params import CostWeights, IterationReport, StyleParams, normalised_layer_weights

logger = logging.getLogger(__name__)

# Half-width of the uniform initial noise in 0-255 pixel units (as in the deeplearning.ai exercise).
NOISE_AMPLITUDE = 20.0
# Adam moment decay rates and epsilon: the usual defaults (Kingma & Ba 2015).
ADAM_BETA1 = 0.9
ADAM_BETA2 = 0.999
ADAM_EPSILON = 1e-8

IterationCallback = Callable[[IterationReport], None]


class StyleTransferError(Exception):
    """The optimisation could not run (bad layers, incompatible images, numerical failure)."""


@dataclass(slots=True)
class StyleResult:
    """The generated image, the cost history, optional intermediate strip, and whether it was cancelled."""

    image: ByteImage
    history: list[IterationReport] = field(default_factory=list)
    strip: ByteImage | None = None
    cancelled: bool = False

    @property
    def iterations(self) -> int:
        """How many iterations were completed."""
        return len(self.history)


@dataclass(frozen=True, slots=True)
class _Terms:
    total: float
    content: float
    style: float
    tv: float


class _CostFunction:
    """Compiled J(G) and dJ/dG for one backbone and layer choice; targets are arguments (no retracing)."""

    def __init__(self, backbone: Backbone, content_layer: str, style_layers: tuple[str, ...],
                 content_norm: str) -> None:
        import tensorflow as tf

        from server.style import costs

        self.layers = list(dict.fromkeys((content_layer, *style_layers)))
        self.extractor = backbone.extractor(self.layers)
        index = {name: i for i, name in enumerate(self.layers)}
        content_i = index[content_layer]
        style_i = [index[name] for name in style_layers]
        image_spec = tf.TensorSpec((1, None, None, 3), tf.float32)
        # Fixed signatures: one trace serves every image size and every job (targets are arguments).
        grads_spec = (
            image_spec,
            tf.TensorSpec((1, None, None, None), tf.float32),
            tuple(tf.TensorSpec((None, None), tf.float32) for _ in style_i),
            tf.TensorSpec((len(style_i),), tf.float32),
            tf.TensorSpec((3,), tf.float32),
        )

        def features(x: Any) -> list[Any]:
            outs = self.extractor(x, training=False)
            return list(outs) if isinstance(outs, list | tuple) else [outs]

        def terms(x: Any, a_c: Any, grams_s: Any, lambdas: Any, coeffs: Any) -> tuple[Any, ...]:
            acts = features(x)
            j_c = costs.content_cost(a_c, acts[content_i], norm=content_norm)  # type: ignore[arg-type]
            j_s = tf.constant(0.0, tf.float32)
            for k, layer_i in enumerate(style_i):
                j_s = j_s + lambdas[k] * costs.layer_style_cost_from_gram(grams_s[k], acts[layer_i])
            j_tv = costs.total_variation(x)
            total = coeffs[0] * j_c + coeffs[1] * j_s + coeffs[2] * j_tv
            return total, j_c, j_s, j_tv

        def value_and_grad(x: Any, a_c: Any, grams_s: Any, lambdas: Any, coeffs: Any) -> tuple[Any, ...]:
            with tf.GradientTape() as tape:
                tape.watch(x)
                total, j_c, j_s, j_tv = terms(x, a_c, grams_s, lambdas, coeffs)
            return total, j_c, j_s, j_tv, tape.gradient(total, x)

        def targets(x: Any) -> tuple[Any, Any]:
            acts = features(x)
            return acts[content_i], tuple(costs.gram_matrix(acts[i]) for i in style_i)

        self.value_and_grad = tf.function(value_and_grad, input_signature=grads_spec)
        self.targets = tf.function(targets, input_signature=[image_spec])


class StyleTransfer:
    """Runs style transfer with one backbone; reusable across runs (the compiled graph is cached)."""

    def __init__(self, backbone: Backbone) -> None:
        self.backbone = backbone
        self._costs: dict[tuple[str, tuple[str, ...], str], _CostFunction] = {}
        self._lock = threading.Lock()

    def layers_for(self, params: StyleParams) -> tuple[str, tuple[str, ...]]:
        """The (content layer, style layers) a run with ``params`` uses."""
        content = params.content_layer or self.backbone.default_content_layer
        style = params.style_layers or self.backbone.default_style_layers
        return content, tuple(style)

    def style_weights_for(self, params: StyleParams) -> dict[str, float]:
        """Per-layer lambdas: explicit, else the backbone's defaults for its default layers, else equal."""
        _, style_layers = self.layers_for(params)
        lambdas = params.style_weights
        if lambdas is None and params.style_layers is None:
            lambdas = self.backbone.default_style_weights
        return normalised_layer_weights(style_layers, lambdas)

    def _cost_function(self, params: StyleParams) -> _CostFunction:
        content, style = self.layers_for(params)
        key = (content, style, params.content_norm)
        with self._lock:
            if key not in self._costs:
                try:
                    self._costs[key] = _CostFunction(self.backbone, content, style, params.content_norm)
                except BackboneError as exc:
                    raise StyleTransferError(str(exc)) from exc
            return self._costs[key]

    def _evaluator(self, content_rgb: ByteImage, style_rgb: ByteImage,
                   params: StyleParams) -> Callable[[FloatArray], tuple[_Terms, FloatArray]]:
        """J and dJ/dG for G of the content's shape, with the content and style targets fixed."""
        import tensorflow as tf

        cost = self._cost_function(params)
        height, width = content_rgb.shape[:2]
        if style_rgb.shape[:2] != (height, width):
            style_rgb = resize_to(style_rgb, height, width)
        a_c, _ = cost.targets(tf.constant(self.backbone.preprocess(content_rgb)))
        _, grams_s = cost.targets(tf.constant(self.backbone.preprocess(style_rgb)))
        _, style_layers = self.layers_for(params)
        lambdas_map = self.style_weights_for(params)
        lambdas = tf.constant([lambdas_map[name] for name in style_layers], tf.float32)
        weights = CostWeights(params.alpha, params.beta, params.gamma)
        coeffs = tf.constant([weights.alpha, weights.beta, weights.gamma], tf.float32)

        def evaluate(x: FloatArray) -> tuple[_Terms, FloatArray]:
            total, j_c, j_s, j_tv, grad = cost.value_and_grad(tf.constant(x), a_c, grams_s, lambdas, coeffs)
            terms = _Terms(float(total), float(j_c), float(j_s), float(j_tv))
            if not np.isfinite(terms.total):
                raise StyleTransferError(f"J(G) became {terms.total}; lower the learning rate or weights")
            return terms, np.asarray(grad, dtype=np.float32)

        return evaluate

    def costs(self, content_rgb: ByteImage, style_rgb: ByteImage, image_rgb: ByteImage,
              params: StyleParams) -> IterationReport:
        """J and its terms for a given RGB image G (iteration 0), e.g. to compare G with the content."""
        if image_rgb.shape != content_rgb.shape:
            raise StyleTransferError(f"G has shape {image_rgb.shape}, the content {content_rgb.shape}")
        terms, _ = self._evaluator(content_rgb, style_rgb, params)(self.backbone.preprocess(image_rgb))
        return IterationReport(0, terms.total, terms.content, terms.style, terms.tv, 0.0)

    def run(self, content_rgb: ByteImage, style_rgb: ByteImage, params: StyleParams, *,
            on_iteration: IterationCallback | None = None,
            cancel: threading.Event | None = None) -> StyleResult:
        """Optimise G for ``params.iters`` iterations (or until cancelled); content sets G's shape."""
        evaluate = self._evaluator(content_rgb, style_rgb, params)
        content_layer, style_layers = self.layers_for(params)
        x0 = self._initial(self.backbone.preprocess(content_rgb), params)
        loop = _Loop(self.backbone, params, evaluate, on_iteration, cancel)
        height, width = content_rgb.shape[:2]
        logger.info("style transfer: %dx%d, %d iterations, %s, content %s, style %s", width, height,
                    params.iters, params.optimizer, content_layer, ",".join(style_layers))
        x = loop.adam(x0) if params.optimizer == "adam" else loop.lbfgs(x0)
        strip = make_strip(loop.frames) if loop.frames else None
        return StyleResult(self.backbone.deprocess(x), loop.history, strip, loop.cancelled)

    def _initial(self, x_c: FloatArray, params: StyleParams) -> FloatArray:
        rng = np.random.default_rng(params.seed)
        noise = rng.uniform(-NOISE_AMPLITUDE, NOISE_AMPLITUDE, size=x_c.shape).astype(np.float32)
        if params.init == "noise":
            x0 = noise  # grey (the mean pixel) plus noise, in preprocessed units
        else:
            x0 = (1.0 - params.noise_ratio) * x_c + params.noise_ratio * noise
        low, high = self.backbone.pixel_bounds()
        return np.clip(x0, low, high).astype(np.float32)


class _Loop:
    """Shared bookkeeping for both optimisers: history, callbacks, strip frames, cancellation."""

    def __init__(self, backbone: Backbone, params: StyleParams,
                 evaluate: Callable[[FloatArray], tuple[_Terms, FloatArray]],
                 on_iteration: IterationCallback | None, cancel: threading.Event | None) -> None:
        self.backbone = backbone
        self.params = params
        self.evaluate = evaluate
        self.on_iteration = on_iteration
        self.cancel = cancel
        self.history: list[IterationReport] = []
        self.frames: list[ByteImage] = []
        self.cancelled = False
        self.started = time.perf_counter()

    def record(self, x: FloatArray, terms: _Terms) -> None:
        """Log one finished iteration and notify the caller."""
        report = IterationReport(len(self.history) + 1, terms.total, terms.content, terms.style, terms.tv,
                                 time.perf_counter() - self.started)
        self.history.append(report)
        every = self.params.strip_every
        if every and report.iteration % every == 0:
            self.frames.append(self.backbone.deprocess(x))
        if self.on_iteration is not None:
            self.on_iteration(report)

    def should_stop(self) -> bool:
        """True once the cancel flag is set (the result so far is kept)."""
        if self.cancel is not None and self.cancel.is_set():
            self.cancelled = True
        return self.cancelled

    def adam(self, x0: FloatArray) -> FloatArray:
        """Adam on G with the step clipped back to valid pixels (J may wiggle)."""
        low, high = self.backbone.pixel_bounds()
        x = x0.copy()
        m = np.zeros_like(x)
        v = np.zeros_like(x)
        lr = self.params.learning_rate
        for t in range(1, self.params.iters + 1):
            if self.should_stop():
                break
            terms, grad = self.evaluate(x)
            m = (ADAM_BETA1 * m + (1 - ADAM_BETA1) * grad).astype(np.float32)
            v = (ADAM_BETA2 * v + (1 - ADAM_BETA2) * np.square(grad)).astype(np.float32)
            m_hat = m / (1 - ADAM_BETA1**t)
            v_hat = v / (1 - ADAM_BETA2**t)
            x = np.clip(x - lr * m_hat / (np.sqrt(v_hat) + ADAM_EPSILON), low, high).astype(np.float32)
            # The costs reported are those of the iterate before this step (one evaluation per iteration).
            self.record(x, terms)
        return x

    def lbfgs(self, x0: FloatArray) -> FloatArray:
        """Box-projected L-BFGS on G; each accepted iterate lowers J (see ``lbfgs``)."""
        from server.style import lbfgs

        low, high = self.backbone.pixel_bounds()

        def fun(x: FloatArray) -> tuple[float, FloatArray, _Terms]:
            terms, grad = self.evaluate(x)
            return terms.total, grad, terms

        def on_iteration(_: int, x: FloatArray, terms: _Terms) -> bool:
            self.record(x, terms)
            return self.should_stop()

        if self.should_stop():
            return x0
        outcome = lbfgs.minimize(fun, x0, low, high, self.params.iters, on_iteration)
        if outcome.iterations < self.params.iters and not self.cancelled:
            logger.info("L-BFGS stopped after %d iterations: %s", outcome.iterations, outcome.reason)
        return outcome.x
