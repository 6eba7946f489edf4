"""Work items: what the dispatcher queues, user jobs and golden checks alike, with a priority and a callback."""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from app.errors import SameseedError
from app.params import GenerationParams
from app.timestamps import utc_now
from app.worker.messages import ImageRendered


class Priority(enum.IntEnum):
    """Lower runs first: a golden check judges its worker before the worker takes more user work."""

    CHECK = 0
    USER = 1


class WorkState(enum.StrEnum):
    """Where a work item is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


FINAL = (WorkState.SUCCEEDED, WorkState.FAILED, WorkState.CANCELED)


class Progress(enum.StrEnum):
    """What `Work.on_progress` is told about, with its data."""

    STARTED = "started"  # the first image went to a worker: {worker, index}
    STEP = "step"  # a denoising step finished: {index, worker, step, steps[, preview_png]}
    IMAGE = "image"  # an image finished: {index, seed, latent_sha256, pixel_sha256, width, height, worker}


@dataclass(eq=False)
class Work:
    """One unit of work: the images of a generation or of a golden run, each rendered on its own.

    `images[k]` holds image k's own parameters (seed already + k). `group_key` keeps every image
    in one reproducibility group (None: the group of the first worker that takes one); `worker_id`
    pins every image to one worker (golden checks). With `all_or_nothing` the first image error
    fails the whole item (a user job); otherwise errors are kept per image (a golden run).
    `on_done` is called once, on the event loop, when the item reaches a final state;
    `on_progress(work, kind, data)` on the event loop as images start, step and finish.
    """

    id: str
    images: tuple[GenerationParams, ...]
    priority: Priority = Priority.USER
    group_key: str | None = None
    worker_id: str | None = None
    all_or_nothing: bool = True
    retries: int = 1  # re-runs of an image whose worker died: safe, the result is deterministic
    on_done: Callable[[Work], None] | None = None
    on_progress: Callable[[Work, Progress, dict[str, Any]], None] | None = None
    state: WorkState = WorkState.QUEUED
    results: dict[int, ImageRendered] = field(default_factory=dict)
    errors: dict[int, SameseedError] = field(default_factory=dict)
    attempts: dict[int, int] = field(default_factory=dict)
    error: SameseedError | None = None
    steps_done: dict[int, int] = field(default_factory=dict)  # image index -> denoising steps finished
    admitted: float = field(default_factory=time.monotonic)
    received_at: str = field(default_factory=utc_now)
    started_at: str | None = None
    finished_at: str | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    trace_context: dict[str, str] = field(default_factory=dict)  # W3C headers: the worker's spans join this trace
    previews: bool = False  # workers send a low-resolution preview with each step (never part of the images)
    solo: frozenset[int] = frozenset()  # image indexes never co-batched (a golden check's single-run references)

    @property
    def finished(self) -> bool:
        """Whether the item reached a final state (succeeded, failed or canceled)."""
        return self.state in FINAL

    @property
    def complete(self) -> bool:
        """Whether every image has a result or an error."""
        return len(self.results) + len(self.errors) == len(self.images)

    def cobatchable(self, index: int) -> bool:
        """Whether image `index` may share a pipeline call with compatible images (previews are per image)."""
        return not self.previews and index not in self.solo

    def ordered_results(self) -> list[ImageRendered]:
        """The rendered images in index order (every image must have succeeded)."""
        return [self.results[k] for k in range(len(self.images))]
