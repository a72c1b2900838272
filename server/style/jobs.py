"""A bounded pool of style-transfer jobs: submit returns at once, workers optimise, callers poll.

Job states: queued -> running -> done | failed | cancelled (a queued job can be cancelled directly).
"""

from __future__ import annotations

import enum
import logging
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType

import numpy as np
from pydantic import BaseModel, Field

from server.style.backbones import BackboneError, make_backbone
from server.style.config import StyleConfig
from server.style.images import ByteImage, decode_image, encode_png, resize_longest
from server.style.params import IterationReport, StyleParams
from server.style.transfer import StyleTransfer, StyleTransferError

logger = logging.getLogger(__name__)


class JobState(enum.StrEnum):
    """Where a job is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL_STATES = frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED})


class StyleJobError(Exception):
    """Base of the job service's errors."""


class JobNotFoundError(StyleJobError, KeyError):
    """No job with that id (never existed, or evicted after ``keep_finished`` newer ones)."""


class JobNotReadyError(StyleJobError):
    """The job has no result (yet): it is queued, running, failed or cancelled."""

    def __init__(self, job_id: str, state: JobState) -> None:
        super().__init__(f"job {job_id} is {state.value}; a result exists only once it is done")
        self.state = state


class StyleBusyError(StyleJobError):
    """Too many queued and running jobs; retry later."""


class StyleParamsError(StyleJobError, ValueError):
    """Parameters valid in themselves but outside this service's limits or this backbone's layers."""


class Losses(BaseModel):
    """The latest costs: weighted total, and the unweighted content, style and TV terms."""

    total: float
    content: float
    style: float
    tv: float


class JobStatus(BaseModel):
    """A snapshot of one job, as the API returns it."""

    id: str
    state: JobState
    backbone: str
    width: int
    height: int
    iteration: int = Field(description="Iterations completed.")
    iterations: int = Field(description="Iterations requested.")
    losses: Losses | None = None
    eta_s: float | None = Field(None, description="Estimated seconds until done (running jobs).")
    elapsed_s: float | None = Field(None, description="Seconds since the job started running.")
    error: str | None = None
    has_strip: bool = False


@dataclass
class _Job:
    id: str
    params: StyleParams
    content: ByteImage
    style: ByteImage
    created: float
    width: int
    height: int
    cancel: threading.Event = field(default_factory=threading.Event)
    state: JobState = JobState.QUEUED
    started: float | None = None
    finished: float | None = None
    last: IterationReport | None = None
    error: str | None = None
    result_png: bytes | None = None
    strip_png: bytes | None = None
    future: Future[None] | None = None


class StyleJobs:
    """The job service: validates inputs on submit, runs jobs on a bounded thread pool, keeps results."""

    def __init__(self, config: StyleConfig) -> None:
        self.config = config
        try:
            backbone = make_backbone(config.backbone, config.weights, random_weights=config.random_weights,
                                     allow_download=config.allow_download)
        except BackboneError as exc:
            raise StyleJobError(f"style service cannot start: {exc}") from exc
        self.transfer = StyleTransfer(backbone)
        self._jobs: dict[str, _Job] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="style-job")
        self._closed = False

    # -- caller side -----------------------------------------------------------------------------
    def submit(self, content: bytes, style: bytes, params: StyleParams | None = None) -> str:
        """Validate the two images and the parameters, queue the job and return its id (never waits on it)."""
        params = params or StyleParams()
        self._check_params(params)
        content_rgb = decode_image(content, max_bytes=self.config.max_upload_bytes,
                                   max_pixels=self.config.max_pixels, label="content")
        style_rgb = decode_image(style, max_bytes=self.config.max_upload_bytes,
                                 max_pixels=self.config.max_pixels, label="style")
        # Keep only the working-size copies: a job then holds a few hundred KB, not two photos.
        content_small = resize_longest(content_rgb, params.size)
        style_small = resize_longest(style_rgb, max(content_small.shape[:2]))
        height, width = content_small.shape[:2]
        job = _Job(uuid.uuid4().hex, params, content_small, style_small, time.time(), width, height)
        with self._lock:
            if self._closed:
                raise StyleJobError("style service is closed")
            pending = sum(1 for j in self._jobs.values() if j.state not in FINAL_STATES)
            if pending >= self.config.max_pending:
                raise StyleBusyError(
                    f"{pending} style jobs pending (limit {self.config.max_pending}); retry later"
                )
            self._jobs[job.id] = job
            job.future = self._pool.submit(self._run, job)
        logger.info("style job %s queued (%dx%d, %d iterations)", job.id, width, height, params.iters)
        return job.id

    def status(self, job_id: str) -> JobStatus:
        """A snapshot of the job's state, progress, losses and ETA."""
        with self._lock:
            return self._snapshot(self._get(job_id))

    def cancel(self, job_id: str) -> JobStatus:
        """Cancel a queued or running job (a finished job is left as it is); returns the new status."""
        with self._lock:
            job = self._get(job_id)
            if job.state not in FINAL_STATES:
                job.cancel.set()
                if job.state is JobState.QUEUED and job.future is not None and job.future.cancel():
                    self._finish(job, JobState.CANCELLED)
            return self._snapshot(job)

    def result_png(self, job_id: str) -> bytes:
        """The generated image as PNG; JobNotReadyError unless the job is done."""
        with self._lock:
            job = self._get(job_id)
            if job.state is not JobState.DONE or job.result_png is None:
                raise JobNotReadyError(job_id, job.state)
            return job.result_png

    def strip_png(self, job_id: str) -> bytes:
        """The strip of intermediate images as PNG (needs ``strip_every`` > 0 and a finished job)."""
        with self._lock:
            job = self._get(job_id)
            if job.strip_png is None:
                raise JobNotReadyError(job_id, job.state)
            return job.strip_png

    def close(self) -> None:
        """Cancel every pending job and stop the workers (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for job in self._jobs.values():
                job.cancel.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            for job in self._jobs.values():
                if job.state is JobState.QUEUED:
                    self._finish(job, JobState.CANCELLED)

    def __enter__(self) -> StyleJobs:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- worker side ----------------------------------------------------------------------------
    def _run(self, job: _Job) -> None:
        with self._lock:
            if job.cancel.is_set():
                self._finish(job, JobState.CANCELLED)
                return
            job.state = JobState.RUNNING
            job.started = time.time()

        def progress(report: IterationReport) -> None:
            with self._lock:
                job.last = report

        try:
            result = self.transfer.run(job.content, job.style, job.params, on_iteration=progress,
                                       cancel=job.cancel)
            png = encode_png(result.image)
            strip = encode_png(result.strip) if result.strip is not None else None
        except (StyleTransferError, BackboneError, ValueError) as exc:
            logger.warning("style job %s failed: %s", job.id, exc)
            with self._lock:
                job.error = str(exc)
                self._finish(job, JobState.FAILED)
            return
        except Exception as exc:  # a worker must never die silently: record and log it
            logger.exception("style job %s crashed", job.id)
            with self._lock:
                job.error = f"internal error: {type(exc).__name__}"
                self._finish(job, JobState.FAILED)
            return
        with self._lock:
            job.strip_png = strip
            if result.cancelled:
                self._finish(job, JobState.CANCELLED)
            else:
                job.result_png = png
                self._finish(job, JobState.DONE)
        logger.info("style job %s %s after %d iterations", job.id, job.state.value, result.iterations)

    # -- helpers (call with the lock held) --------------------------------------------------------
    def _get(self, job_id: str) -> _Job:
        try:
            return self._jobs[job_id]
        except KeyError:
            raise JobNotFoundError(f"no style job {job_id!r}") from None

    def _finish(self, job: _Job, state: JobState) -> None:
        job.state = state
        job.finished = time.time()
        # Free the inputs at once; evict the oldest finished jobs beyond keep_finished.
        job.content = job.style = np.zeros((0, 0, 3), np.uint8)
        finished = sorted((j for j in self._jobs.values() if j.state in FINAL_STATES),
                          key=lambda j: j.finished or 0.0)
        for old in finished[: max(0, len(finished) - self.config.keep_finished)]:
            del self._jobs[old.id]

    def _snapshot(self, job: _Job) -> JobStatus:
        last = job.last
        iteration = last.iteration if last else 0
        eta = elapsed = None
        if job.started is not None:
            elapsed = (job.finished or time.time()) - job.started
        if job.state is JobState.RUNNING and last is not None and iteration > 0:
            eta = last.elapsed_s / iteration * (job.params.iters - iteration)
        losses = None
        if last is not None:
            losses = Losses(total=last.total, content=last.content, style=last.style, tv=last.tv)
        return JobStatus(id=job.id, state=job.state, backbone=self.transfer.backbone.name,
                         width=job.width, height=job.height, iteration=iteration,
                         iterations=job.params.iters, losses=losses, eta_s=eta, elapsed_s=elapsed,
                         error=job.error, has_strip=job.strip_png is not None)

    def _check_params(self, params: StyleParams) -> None:
        if params.size > self.config.max_size:
            raise StyleParamsError(f"size {params.size} exceeds the limit {self.config.max_size}")
        if params.iters > self.config.max_iters:
            raise StyleParamsError(f"iters {params.iters} exceeds the limit {self.config.max_iters}")
        custom = [params.content_layer] if params.content_layer else []
        custom += list(params.style_layers or ())
        if custom:
            try:
                known = set(self.transfer.backbone.layer_names())
            except BackboneError as exc:
                raise StyleJobError(str(exc)) from exc
            unknown = [name for name in custom if name not in known]
            if unknown:
                raise StyleParamsError(f"{self.transfer.backbone.name} has no layer(s) {unknown}")
