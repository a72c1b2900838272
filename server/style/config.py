"""Configuration of the style-transfer job service (embed it in the server's config as ``style``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.style.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from server.style.params import MAX_ITERATIONS, MAX_SIZE_PX, MIN_SIZE_PX


class StyleConfig(BaseModel):
    """Backbone, worker pool and input limits of the style-transfer service."""

    model_config = ConfigDict(extra="forbid")

    backbone: Literal["vgg19", "squeezenet"] = Field("squeezenet", description="Feature network.")
    weights: Path | None = Field(None, description="Backbone weights file (.h5).")
    random_weights: bool = Field(
        False, description="Use untrained weights (tests and timing only; results are meaningless)."
    )
    allow_download: bool = Field(False, description="Let Keras download VGG19 ImageNet weights.")
    workers: int = Field(1, ge=1, le=16, description="Jobs optimised at once (each uses all cores).")
    max_pending: int = Field(8, ge=1, le=1000, description="Queued plus running jobs before refusing.")
    keep_finished: int = Field(50, ge=1, le=10_000, description="Finished jobs (and results) kept.")
    max_upload_bytes: int = Field(DEFAULT_MAX_BYTES, ge=1024, description="Largest accepted upload.")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1024, description="Largest accepted image (W*H).")
    max_size: int = Field(512, ge=MIN_SIZE_PX, le=MAX_SIZE_PX, description="Largest size (longest side).")
    max_iters: int = Field(1000, ge=1, le=MAX_ITERATIONS, description="Most iterations per job.")

    @model_validator(mode="after")
    def _weights_or_random(self) -> StyleConfig:
        if self.weights is None and not self.random_weights and not self.allow_download:
            raise ValueError("style: set weights (a .h5 file), or random_weights for tests/timing only")
        return self
