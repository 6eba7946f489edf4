"""Jobs that outlive a request: asynchronous submission, an event log per job, cancellation, and their ledger rows.

A job wraps one generation's work item. Everything that happens to it becomes a numbered event
(`queued`, `started`, `step`, `image`, then `succeeded`, `failed` or `canceled`) kept in memory,
so a client that reconnects with the last id it saw resumes without loss. An asynchronous job
(`durable`) is recorded in the ledger before its 202 leaves, and its state is written as it
changes; after a restart a job the previous process did not finish is reported `failed`
(`interrupted`), never lost.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import functools
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from app.errors import (
    ClientDisconnected,
    GenerationNotFound,
    Interrupted,
    JobCanceled,
    SameseedError,
    StorageUnavailable,
)
from app.params import GenerationParams
from app.provenance.manifest import Manifest
from app.scheduler.work import Progress, Work, WorkState
from app.services.generation import GenerationService, new_generation_id
from app.store.ledger import JobRow, JobState, Ledger, LedgerError
from app.timestamps import utc_now

log = logging.getLogger("app.jobs")

KEEPALIVE_S = 15.0  # a comment line this often keeps proxies from closing an idle stream
ADMIN = "admin"  # the owner of requests made with an admin API key: they see every job
KEEP_FINISHED = 512  # finished jobs whose events stay in memory (older ones answer from the ledger)

# (manifest, PNGs or None when pruned, response_format) -> the JSON a synchronous POST answers
Presenter = Callable[[Manifest, list[bytes] | None, str], dict[str, Any]]


@dataclass(frozen=True, eq=False)
class JobEvent:
    """One numbered event of a job's life; ids start at 1 and have no gaps."""

    id: int
    name: str
    data: dict[str, Any]

    @functools.cached_property
    def data_json(self) -> str:
        """`data` as compact JSON, encoded once however many clients follow the job."""
        return json.dumps(self.data, separators=(",", ":"), ensure_ascii=False)


@dataclass(eq=False)
class Job:
    """A generation followed by id: its state, progress and event log (changed by the JobService only)."""

    id: str
    params: GenerationParams
    response_format: str
    owner: str | None
    reproducibility_key: str | None
    durable: bool
    received_at: str = field(default_factory=utc_now)
    updated_at: str = field(default_factory=utc_now)
    state: JobState = JobState.QUEUED
    work: Work | None = None
    error: SameseedError | None = None
    result: dict[str, Any] | None = None
    images_done: int = 0
    progress: dict[str, Any] | None = None  # the last step event's data
    queue_position: int | None = None
    events: list[JobEvent] = field(default_factory=list)
    _signal: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def finished(self) -> bool:
        """Whether the job reached succeeded, failed or canceled."""
        return self.state in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED)

    @property
    def steps_done(self) -> int:
        """Denoising steps finished over all its images."""
        return sum(self.work.steps_done.values()) if self.work is not None else 0

    def emit(self, name: str, data: dict[str, Any]) -> None:
        """Append an event and wake every follower."""
        self.events.append(JobEvent(len(self.events) + 1, name, data))
        self.updated_at = utc_now()
        self.wake()

    def wake(self) -> None:
        """Wake every follower; one that finds no new event yields a keepalive (the JobService's tick)."""
        signal, self._signal = self._signal, asyncio.Event()
        signal.set()

    def changed(self) -> asyncio.Event:
        """An event set when the next event is appended (take it before reading `events`)."""
        return self._signal

    async def follow(self, after: int = 0) -> AsyncIterator[JobEvent | None]:
        """Every event with an id above `after`, then new ones as they come, until the final one.

        Yields None when woken without news (`wake`: the JobService does it every KEEPALIVE_S; the stream
        sends a comment line then).
        """
        sent = max(0, after)
        while True:
            signal = self._signal  # taken before reading: an event appended meanwhile sets it
            while sent < len(self.events):
                sent += 1
                yield self.events[sent - 1]
            if self.finished:
                return
            # No timer per wait: with hundreds of followers, arming and cancelling one each time an event
            # woke them cost more than writing the event; one tick for every job keeps idle streams alive.
            await signal.wait()
            if sent == len(self.events) and not self.finished:
                yield None


def _error_json(error: SameseedError | None) -> str | None:
    return json.dumps(error.body()) if error is not None else None


class JobService:
    """Submits, follows and cancels jobs; keeps durable jobs' states in the ledger."""

    def __init__(
        self, *, generations: GenerationService, ledger: Ledger | None, present: Presenter,
        keep_finished: int = KEEP_FINISHED, node: str | None = None,
    ) -> None:
        self.generations = generations
        self.ledger = ledger
        self.node = node  # this server's name in a shared ledger: it recovers only its own jobs
        self.present = present
        self.keep_finished = keep_finished
        self._jobs: dict[str, Job] = {}
        self._finished: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self._writes: asyncio.Queue[tuple[Callable[..., None], tuple[Any, ...]]] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> int:
        """Report the jobs a previous process left unfinished (failed, or succeeded when stored); returns how many."""
        self._writer = asyncio.create_task(self._write_loop(), name="job-ledger")
        self._ticker = asyncio.create_task(self._keepalive_loop(), name="job-keepalive")
        if self.ledger is None:
            return 0
        return await asyncio.to_thread(self._recover)

    def _recover(self) -> int:
        assert self.ledger is not None
        # A shared ledger: other servers' unfinished jobs are still running there, not interrupted.
        rows = self.ledger.unfinished_jobs(node=self.node if self.ledger.shared else None)
        for row in rows:
            if self.ledger.get(row.id) is not None:  # stored before the crash, its row not updated yet
                params = GenerationParams(**json.loads(row.params))
                self.ledger.update_job(
                    row.id, JobState.SUCCEEDED, utc_now(), images_done=params.num_images, steps_done=row.steps_done
                )
                continue
            error = Interrupted(
                f"the server stopped before {row.id} finished (it was {row.state.value}); "
                "submit the same request again: it gives the same images"
            )
            self.ledger.update_job(
                row.id, JobState.FAILED, utc_now(), images_done=row.images_done, steps_done=row.steps_done,
                error=_error_json(error),
            )
            log.warning("job interrupted by a restart", extra={"generation_id": row.id})
        return len(rows)

    async def stop(self) -> None:
        """Let jobs record how they ended (the dispatcher failed what was left) and the writes land; stop the writer."""
        if self._writer is None:
            return
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5.0)
        await self._writes.join()
        for task in (self._writer, self._ticker):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _keepalive_loop(self) -> None:
        while True:
            await asyncio.sleep(KEEPALIVE_S)
            self.keepalive()

    def keepalive(self) -> None:
        """Wake the followers of every unfinished job: those with no news send a keepalive comment."""
        for job in list(self._jobs.values()):
            if not job.finished:
                job.wake()

    async def _write_loop(self) -> None:
        """One writer, in order: a job's `running` row never overtakes its insert, nor its final state."""
        while True:
            function, args = await self._writes.get()
            try:
                await asyncio.to_thread(function, *args)
            except Exception:  # a lost progress write must not stop the others; the final one may still land
                log.exception("job ledger write failed")
            finally:
                self._writes.task_done()

    def _write(self, function: Callable[..., None], *args: Any) -> Awaitable[None]:  # noqa: ANN401
        """Queue a ledger write; the returned future resolves once it is committed."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def run(*call_args: Any) -> None:  # noqa: ANN401
            try:
                function(*call_args)
            except Exception as exc:
                done.get_loop().call_soon_threadsafe(_settle, done, exc)
                raise
            done.get_loop().call_soon_threadsafe(_settle, done, None)

        self._writes.put_nowait((run, args))
        return done

    # ------------------------------------------------------------------ submission
    async def submit(
        self,
        params: GenerationParams,
        *,
        response_format: str,
        reproducibility_key: str | None = None,
        owner: str | None = None,
        durable: bool = True,
        received_at: str | None = None,
        previews: bool = False,
    ) -> Job:
        """Accept a job: a durable one is in the ledger when this returns; admission errors raise (nothing kept)."""
        job = Job(
            id=new_generation_id(), params=params, response_format=response_format, owner=owner,
            reproducibility_key=reproducibility_key, durable=durable, received_at=received_at or utc_now(),
        )
        if durable and self.ledger is not None:
            row = JobRow(
                id=job.id, state=JobState.QUEUED, params=json.dumps(params.as_dict()), response_format=response_format,
                received_at=job.received_at, updated_at=job.updated_at, owner=owner,
                reproducibility_key=reproducibility_key, node=self.node,
            )
            try:
                await self._write(self.ledger.insert_job, row)
            except (OSError, LedgerError) as exc:  # not recorded: not accepted
                raise StorageUnavailable(f"the ledger cannot record the job ({exc})") from None
        try:
            job.work = self.generations.submit(
                params, work_id=job.id, reproducibility_key=reproducibility_key, received_at=job.received_at,
                on_progress=lambda _work, kind, data: self._on_progress(job, kind, data), previews=previews,
            )
        except SameseedError:
            if durable and self.ledger is not None:  # never accepted: the client gets the error instead
                self._writes.put_nowait((self.ledger.delete_job, (job.id,)))
            raise
        self._jobs[job.id] = job
        if job.state is JobState.QUEUED:  # it may have started at once
            job.queue_position = self.generations.dispatcher.queue_position(job.work)
            job.emit("queued", {"position": job.queue_position})
        task = asyncio.create_task(self._run(job), name=f"job-{job.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    async def _run(self, job: Job) -> None:
        assert job.work is not None
        try:
            generation = await self.generations.complete(job.work, job.params)
            stored = await self.generations.store(generation)
        except SameseedError as exc:
            canceled = job.work.state is WorkState.CANCELED
            self._finish(job, JobState.CANCELED if canceled else JobState.FAILED, error=exc)
            return
        except Exception as exc:  # a bug must still end the job visibly
            log.exception("job crashed", extra={"generation_id": job.id})
            self._finish(job, JobState.FAILED, error=SameseedError(f"internal error ({type(exc).__name__})"))
            return
        job.result = self.present(stored.manifest, stored.pngs, job.response_format)
        self._finish(job, JobState.SUCCEEDED)

    def _on_progress(self, job: Job, kind: Progress, data: dict[str, Any]) -> None:
        if kind is Progress.STARTED:
            job.state, job.queue_position = JobState.RUNNING, None
            job.emit("started", data)
            self._persist(job)
            self._requeue_positions()
        elif kind is Progress.STEP:
            job.progress = {"index": data["index"], "step": data["step"], "steps": data["steps"]}
            if "preview_png" in data:  # only in the event, never in the job's status or the result
                job.emit("step", {**job.progress, "preview": base64.b64encode(data["preview_png"]).decode("ascii")})
            else:
                job.emit("step", job.progress)
        elif kind is Progress.IMAGE:
            job.images_done += 1
            job.emit("image", data)

    def _requeue_positions(self) -> None:
        """Tell every queued job its new place once one ahead of it started or left."""
        dispatcher = self.generations.dispatcher
        for other in self._jobs.values():
            if other.state is JobState.QUEUED and other.work is not None:
                position = dispatcher.queue_position(other.work)
                if position is not None and position != other.queue_position:
                    other.queue_position = position
                    other.emit("queued", {"position": position})

    def _finish(self, job: Job, state: JobState, *, error: SameseedError | None = None) -> None:
        job.state, job.error, job.queue_position = state, error, None
        if state is JobState.SUCCEEDED:
            job.emit("succeeded", job.result or {})
        else:
            assert error is not None
            job.emit(state.value, {**error.body(), "steps_done": job.steps_done, "images_done": job.images_done})
        self._persist(job)
        self._requeue_positions()
        self._finished[job.id] = None
        while len(self._finished) > self.keep_finished:
            old, _ = self._finished.popitem(last=False)
            self._jobs.pop(old, None)

    def _persist(self, job: Job) -> None:
        if job.durable and self.ledger is not None:
            progress = (job.images_done, job.steps_done, _error_json(job.error))
            self._writes.put_nowait((self._update_row, (job.id, job.state, job.updated_at, *progress)))

    def _update_row(
        self, job_id: str, state: JobState, at: str, images_done: int, steps_done: int, error: str | None
    ) -> None:
        assert self.ledger is not None
        self.ledger.update_job(job_id, state, at, images_done=images_done, steps_done=steps_done, error=error)

    # ------------------------------------------------------------------ reading and canceling
    def find(self, job_id: str, owner: str | None) -> Job | None:
        """A job this process knows (running, or finished recently); None when it does not.

        GenerationNotFound when the job belongs to another API key: to its caller it does not exist.
        """
        job = self._jobs.get(job_id)
        if job is not None and not _may_see(job.owner, owner):
            raise _not_found(job_id)
        return job

    async def status(self, job_id: str, owner: str | None) -> dict[str, Any] | None:
        """The job's status as GET answers it, from memory or else the ledger; None when there is no such job."""
        job = self.find(job_id, owner)
        if job is not None:
            return self.describe(job)
        if self.ledger is None:
            return None
        row = await asyncio.to_thread(self.ledger.get_job, job_id)
        if row is None:
            return None
        if not _may_see(row.owner, owner):
            raise _not_found(job_id)
        return await self._describe_row(row)

    def describe(self, job: Job) -> dict[str, Any]:
        """A job's status: state, place in the queue, progress, and its result or error once finished."""
        if job.state is JobState.QUEUED and job.work is not None:
            job.queue_position = self.generations.dispatcher.queue_position(job.work)
        return {
            "id": job.id,
            "state": job.state.value,
            "received_at": job.received_at,
            "updated_at": job.updated_at,
            "num_images": job.params.num_images,
            "images_done": job.images_done,
            "steps_done": job.steps_done,
            "queue_position": job.queue_position,
            "progress": job.progress if job.state is JobState.RUNNING else None,
            "error": job.error.body()["error"] if job.error is not None else None,
            "result": job.result,
        }

    async def _describe_row(self, row: JobRow) -> dict[str, Any]:
        result = None
        if row.state is JobState.SUCCEEDED:
            result = await asyncio.to_thread(self._stored_result, row)
        params = json.loads(row.params)
        return {
            "id": row.id,
            "state": row.state.value,
            "received_at": row.received_at,
            "updated_at": row.updated_at,
            "num_images": params["num_images"],
            "images_done": params["num_images"] if result is not None else row.images_done,
            "steps_done": row.steps_done,
            "queue_position": None,
            "progress": None,
            "error": json.loads(row.error)["error"] if row.error else None,
            "result": result,
        }

    def _stored_result(self, row: JobRow) -> dict[str, Any] | None:
        archive = self.generations.archive
        if archive is None:
            return None
        try:
            stored = archive.get(row.id)
        except GenerationNotFound:
            return None
        manifest = Manifest.model_validate_json(stored.manifest)
        pngs: list[bytes] | None = None
        if row.response_format == "b64_png":
            with contextlib.suppress(SameseedError):  # pruned: answer the links and hashes only
                pngs = [archive.image_bytes(row.id, image.index) for image in stored.images]
        return self.present(manifest, pngs, row.response_format)

    async def events(self, job_id: str, owner: str | None, after: int = 0) -> AsyncIterator[JobEvent | None]:
        """The job's events after id `after` until its final one (see Job.follow); GenerationNotFound when unknown.

        A job only the ledger knows (finished before a restart, or evicted) has one event: its final state.
        """
        job = self.find(job_id, owner)
        if job is not None:
            return job.follow(after)
        status = await self.status(job_id, owner)
        if status is None:
            raise _not_found(job_id)
        return _final_only(status, after)

    def cancel(self, job: Job, reason: SameseedError | None = None) -> None:
        """Cancel a job: queued images are dropped at once, running ones stop at their next step."""
        if job.finished or job.work is None:
            return
        error = reason or JobCanceled(f"{job.id} was canceled after {job.steps_done} denoising steps")
        self.generations.dispatcher.cancel(job.work, error)

    async def cancel_and_settle(self, job: Job, timeout_s: float = 5.0) -> None:
        """Cancel a job and wait (briefly) until it shows its final state."""
        self.cancel(job)
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not job.finished and asyncio.get_running_loop().time() < deadline:
            signal = job.changed()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(signal.wait(), deadline - asyncio.get_running_loop().time())

    def abandon(self, job: Job) -> None:
        """The client of a streamed synchronous job went away: cancel it as a disconnect."""
        self.cancel(job, ClientDisconnected(f"the client of {job.id} disconnected; its images were dropped"))


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _not_found(job_id: str) -> GenerationNotFound:
    return GenerationNotFound(f"no job {job_id!r} on this server", param="generation_id")


def _may_see(job_owner: str | None, owner: str | None) -> bool:
    """A job made with an API key is visible to that key and admin keys only (no keys on the server: to everyone)."""
    return job_owner is None or job_owner == owner or owner == ADMIN


async def _final_only(status: dict[str, Any], after: int) -> AsyncIterator[JobEvent | None]:
    state = status["state"]
    if after >= 1 or state in (JobState.QUEUED.value, JobState.RUNNING.value):
        return  # an unfinished row without a live job cannot happen once start() ran
    if state == JobState.SUCCEEDED.value:
        yield JobEvent(1, "succeeded", status["result"] or {})
    else:
        error = {"error": status["error"], "steps_done": status["steps_done"], "images_done": status["images_done"]}
        yield JobEvent(1, state, error)
