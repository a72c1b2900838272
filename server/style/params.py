"""The parameters of one style-transfer run (validated once, shared by CLI, API and job service)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ContentNorm = Literal["seed", "course"]
CONTENT_NORMS: tuple[ContentNorm, ...] = ("seed", "course")

# Longest image side: below 32 px SqueezeNet's deeper layers vanish; above 1024 a CPU job takes hours.
MIN_SIZE_PX = 32
MAX_SIZE_PX = 1024
# A bound on a single job's work so a request cannot occupy a worker for hours.
MAX_ITERATIONS = 5000


class StyleParams(BaseModel):
    """What to optimise and how: cost weights, layers, optimiser, initialisation, image size."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: int = Field(256, ge=MIN_SIZE_PX, le=MAX_SIZE_PX, description="Longest side of G in pixels.")
    iters: int = Field(200, ge=1, le=MAX_ITERATIONS, description="Optimiser iterations.")
    alpha: float = Field(10.0, ge=0, description="Weight of the content cost.")
    beta: float = Field(40.0, ge=0, description="Weight of the style cost.")
    gamma: float = Field(0.0, ge=0, description="Weight of the total-variation smoothness term.")
    content_layer: str | None = Field(None, description="Content layer; None = the backbone's default.")
    style_layers: tuple[str, ...] | None = Field(
        None, min_length=1, description="Style layers; None = the backbone's defaults."
    )
    style_weights: tuple[float, ...] | None = Field(
        None, description="Per-layer lambdas, same length as style_layers; None = equal, summing to 1."
    )
    content_norm: ContentNorm = Field(
        "course", description="'course' = 1/(4 nH nW nC) * sum sq; 'seed' = 1/2 * sum sq."
    )
    optimizer: Literal["adam", "lbfgs"] = Field("lbfgs", description="Adam or L-BFGS-B (box-bounded).")
    learning_rate: float = Field(4.0, gt=0, le=100, description="Adam step size in 0-255 pixel units.")
    init: Literal["content", "noise"] = Field("content", description="Start from content+noise or noise.")
    noise_ratio: float = Field(0.2, ge=0, le=1, description="Share of noise in the 'content' start.")
    seed: int = Field(0, ge=0, description="Seed of the initial noise.")
    strip_every: int = Field(0, ge=0, description="Keep an intermediate image every N iterations (0: never).")

    @model_validator(mode="after")
    def _weights_match_layers(self) -> StyleParams:
        if self.style_weights is not None:
            if self.style_layers is None:
                raise ValueError("style_weights needs style_layers (one weight per layer)")
            if len(self.style_weights) != len(self.style_layers):
                raise ValueError(
                    f"{len(self.style_layers)} style layers but {len(self.style_weights)} style weights"
                )
            if any(w < 0 for w in self.style_weights):
                raise ValueError("style weights must be >= 0")
        return self


@dataclass(frozen=True, slots=True)
class IterationReport:
    """The costs after one iteration (already weighted sum in ``total``; terms unweighted)."""

    iteration: int
    total: float
    content: float
    style: float
    tv: float
    elapsed_s: float


@dataclass(frozen=True, slots=True)
class CostWeights:
    """alpha (content), beta (style), gamma (total variation) in J = a*Jc + b*Js + g*TV."""

    alpha: float
    beta: float
    gamma: float = 0.0


def normalised_layer_weights(layers: Sequence[str], lambdas: Sequence[float] | None) -> dict[str, float]:
    """Pair style layers with their lambdas; equal weights summing to 1 when none are given."""
    if not layers:
        raise ValueError("at least one style layer is needed")
    if lambdas is None:
        return {name: 1.0 / len(layers) for name in layers}
    if len(lambdas) != len(layers):
        raise ValueError(f"{len(layers)} style layers but {len(lambdas)} style weights")
    if any(lam < 0 for lam in lambdas):
        raise ValueError("style layer weights must be >= 0")
    return dict(zip(layers, (float(lam) for lam in lambdas), strict=True))
