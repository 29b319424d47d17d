"""The scheduler: admits jobs, queues their images, merges batches, runs them, records results.

One instance owns the queues (a single-replica Serve deployment in production; in-process in
tests and benchmarks). It talks to engines through :class:`EngineClient`, so the same code runs
over Ray handles or over engines in this process. Every state change is written to the job
store before it is announced; after a crash, :meth:`start` rebuilds the queues from the store
(queued jobs, and running jobs whose lease expired) so nothing accepted is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from opentelemetry.trace import Link
from sqlalchemy.exc import DBAPIError

from zimage_platform.billing.ledger import LedgerEntry
from zimage_platform.db import utcnow
from zimage_platform.scheduling.admission import Admission, AdmissionLimit, QueueFull, TenantQueueShare, month_start
from zimage_platform.scheduling.dispatcher import Dispatcher, pool_policies
from zimage_platform.scheduling.events import EventHub
from zimage_platform.scheduling.models import TERMINAL, BatchRow, JobRow
from zimage_platform.scheduling.store import DoneImage, Finish, JobStore, NewJob, StoredImage
from zimage_platform.scheduling.work import Batch, BatchOutcome, ItemOutcome, Progress, WorkItem, WorkKey
from zimage_platform.telemetry.metrics import metrics
from zimage_platform.telemetry.tracing import carrier, context_of, span, span_context_of, tracer

if TYPE_CHECKING:
    from zimage_platform.config import PlatformConfig

log = logging.getLogger(__name__)

__all__ = [
    "AdmissionLimit",
    "EngineClient",
    "QueueFull",
    "SchedulerService",
    "TenantQueueShare",
    "month_start",
    "work_key",
]

#: Seconds a tenant's monthly usage count is trusted before it is read from the store again.
USAGE_TTL_S = 5.0
#: Database errors worth waiting out (the server went away, restarted, or was busy).
_RETRYABLE_DB_ERRORS = frozenset({"OperationalError", "InterfaceError"})


class EngineClient(Protocol):
    """How the scheduler reaches engine replicas (Ray handles, or engines in this process)."""

    async def run(
        self,
        batch: Batch,
        on_progress: Callable[[Progress], None],
        on_released: Callable[[], None] | None = None,
    ) -> BatchOutcome:
        """Run ``batch``; ``on_released`` is called once the engine may take the next batch
        (before the images are stored)."""
        ...

    async def cancel(self, pool: str, variant: str, item_ids: list[str]) -> None: ...

    async def wake(self, pool: str, variant: str) -> None:
        """Return once the engine deployment has a replica (asks a scaled-to-zero one to start)."""
        ...


JobListener = Callable[[str, str, dict[str, Any], JobRow], None]


def work_key(row: JobRow) -> WorkKey:
    p = row.params
    return WorkKey(
        variant=row.variant,
        size=p["size"],
        steps=p["steps"],
        cfg=p["guidance"] > 0,
        sampler=p["sampler"],
        shift=p["shift"],
        strength=p["strength"] if p.get("input_key") else None,
        hires=(p["hires_from"], p["hires_denoise"]) if p.get("hires_from") else None,
        scheduler=p.get("scheduler", "simple"),
    )


@dataclass
class Submitted:
    """What a synchronous submission gets back: the job (terminal unless ``timed_out``) and, for
    inline responses, the PNG of each delivered image by index."""

    row: JobRow
    created: bool
    timed_out: bool = False
    pngs: dict[int, bytes] = field(default_factory=dict)


@dataclass
class _Active:
    """A job with images queued or in flight, as this scheduler sees it."""

    row: JobRow
    remaining: set[int]
    inflight: set[int] = field(default_factory=set)
    failures: dict[int, int] = field(default_factory=dict)
    started: bool = False
    last_error: tuple[str, str] | None = None


class _ActiveJobs:
    """Jobs with images queued or in flight, with the concurrency slots each tenant holds: a job
    takes one, a bulk batch one for all its jobs (while any of them is active). The cap is checked
    on every submission, so it must not scan every active job."""

    def __init__(self) -> None:
        self._jobs: dict[str, _Active] = {}
        self._slots: dict[str, int] = {}
        #: Bulk batch id → its active jobs.
        self._batch_jobs: dict[str, int] = {}

    def add(self, job_id: str, active: _Active) -> _Active:
        if job_id not in self._jobs:
            self._count(active.row, +1)
        self._jobs[job_id] = active
        return active

    def pop(self, job_id: str, default: _Active | None = None) -> _Active | None:
        active = self._jobs.pop(job_id, None)
        if active is None:
            return default
        self._count(active.row, -1)
        return active

    def _count(self, row: JobRow, delta: int) -> None:
        if row.batch_id is not None:
            jobs = self._batch_jobs.get(row.batch_id, 0) + delta
            if jobs:
                self._batch_jobs[row.batch_id] = jobs
            else:
                del self._batch_jobs[row.batch_id]
            if jobs != (1 if delta > 0 else 0):
                return  # not the batch's first job in, nor its last out: its slot is unchanged
        slots = self._slots.get(row.tenant_id, 0) + delta
        if slots:
            self._slots[row.tenant_id] = slots
        else:
            del self._slots[row.tenant_id]

    def get(self, job_id: str) -> _Active | None:
        return self._jobs.get(job_id)

    def count(self, tenant_id: str) -> int:
        """Concurrency slots ``tenant_id`` holds (jobs, and bulk batches counted once)."""
        return self._slots.get(tenant_id, 0)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._jobs

    def __len__(self) -> int:
        return len(self._jobs)

    def __iter__(self) -> Iterator[str]:
        return iter(self._jobs)

    def items(self):
        return self._jobs.items()

    def values(self):
        return self._jobs.values()


class SchedulerService:
    def __init__(
        self,
        config: PlatformConfig,
        store: JobStore,
        engines: EngineClient,
        *,
        clock: Callable[[], float] = time.monotonic,
        owner: str | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.engines = engines
        self.clock = clock
        self.owner = owner or f"scheduler-{uuid.uuid4().hex[:8]}"
        self.hub = EventHub()
        self.dispatcher = Dispatcher(pool_policies(config), starvation_s=config.scheduler.starvation_s)
        #: Queue bounds, tenant caps and quotas: the same code the capacity simulator runs.
        self.admission = Admission(config.pools, self.dispatcher)
        self._active = _ActiveJobs()
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._batches: dict[str, Batch] = {}
        self._deployments = [(pool, v) for pool in config.pools for v in config.pool_variants(pool)]
        #: Engine deployments (pool, variant) with a wake-up call outstanding.
        self._waking: set[tuple[str, str]] = set()
        #: Batches whose engine slot is still taken (released before their images are recorded).
        self._holding: set[str] = set()
        self._cancelled_items: set[str] = set()
        #: Running jobs a client cancelled (their images stop at the next step boundary).
        self._cancelling: set[str] = set()
        #: Finishes the database refused (job → status, code, message): the sweep tries again, since
        #: a queued job let go has no lease to lapse and would otherwise wait for a restart.
        self._unfinished: dict[str, tuple[str, str | None, str | None]] = {}
        #: Monthly image usage per tenant: (counted at, month, images).
        self._usage: dict[str, tuple[float, datetime, int]] = {}
        #: PNGs of jobs whose synchronous caller waits for them inline (job → index → bytes).
        self._inline: dict[str, dict[int, bytes]] = {}
        self._listeners: list[JobListener] = []
        self._running = False
        #: Batches placed on a replica, and those that ran on another one (it had gone).
        self._placed = 0
        self._rerouted = 0

    # -- setup --------------------------------------------------------------------------

    def add_listener(self, listener: JobListener) -> None:
        """Called for every job event (webhooks, metrics, bulk-batch bookkeeping)."""
        self._listeners.append(listener)

    def set_capacity(self, pool: str, variant: str, batches: int) -> None:
        self.dispatcher.set_capacity(pool, variant, batches)
        self._wake.set()

    def set_replicas(self, pool: str, variant: str, slots: dict[str, int]) -> None:
        """The live replicas of an engine deployment (heartbeats) and their batch slots: batches
        are then placed on a replica whose engine is free (``Batch.replica``)."""
        self.dispatcher.set_replicas(pool, variant, slots)
        self._wake.set()

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Rebuild the queues from the store, then start dispatching and sweeping."""
        self._running = True
        for listener in self._listeners:
            if hasattr(listener, "start"):
                await listener.start()
        for row in await self._db("requeue", self.store.requeue_expired):
            if row.status == "cancelled":
                self._emit(row, "cancelled", reason=row.error_code)
        for row in await self._db("queued", self.store.queued):
            await self._enqueue(row)
        self._spawn(self._dispatch_loop())
        self._spawn(self._sweep_loop())

    async def stop(self, grace_s: float = 30.0) -> None:
        """Stop starting batches; let the running ones finish (or hand their jobs back)."""
        self._running = False
        self._wake.set()
        inflight = [t for t in self._tasks if t.get_name().startswith("batch-")]
        if inflight:
            await asyncio.wait(inflight, timeout=grace_s)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # Whatever still runs goes back to the queue for the next scheduler.
        leftover = [job_id for job_id, a in self._active.items() if a.started]
        with contextlib.suppress(Exception):  # the database may be gone: the leases then run out
            await asyncio.to_thread(self.store.release, leftover, self.owner)
        for listener in self._listeners:
            if hasattr(listener, "stop"):
                await listener.stop()

    async def _db(self, operation: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A store call off the event loop, retried with backoff while the database is unreachable
        (connection refused or dropped, locked): up to ``scheduler.db_retry_s``, then the error."""
        deadline = self.clock() + self.config.scheduler.db_retry_s
        delay = 0.05
        while True:
            try:
                return await asyncio.to_thread(call, *args, **kwargs)
            except DBAPIError as exc:
                retryable = exc.connection_invalidated or type(exc).__name__ in _RETRYABLE_DB_ERRORS
                if not retryable or self.clock() + delay > deadline:
                    raise
                metrics().db_errors.inc(operation=f"scheduler.{operation}")
                log.warning("database %s failed (%s); retrying in %.2fs", operation, type(exc.orig).__name__, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _spawn(self, coro, name: str | None = None) -> asyncio.Task:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- admission ----------------------------------------------------------------------

    def check_admission(self, priority: str, images: int, tenant_id: str | None = None) -> None:
        """429 ``queue_full`` when the class's queue would pass its bound, ``tenant_queue_share``
        when ``tenant_id``'s waiting images would pass its share of it (nothing is written)."""
        self.admission.check_queue(priority, images, self.clock(), tenant_id)

    def retry_after(self, pool: str, depth: int) -> int:
        """Seconds until ``depth`` images drain at the recently measured rate."""
        return self.admission.drain.retry_after(depth, self.clock())

    def tenant_jobs(self, tenant_id: str) -> int:
        """Concurrency slots the tenant holds here (a bulk batch counts once)."""
        return self._active.count(tenant_id)

    @contextlib.asynccontextmanager
    async def _admitted(self, job: NewJob, *, jobs: int, images: int, check_queue: bool = True) -> AsyncIterator[None]:
        """The whole admission of one submission (``job``: it, or a bulk batch's first job) — queue
        bound and the tenant's share of it, concurrency slots, monthly quota — then its room held
        until the body has written and queued the jobs. Nothing awaits between the checks and the
        reservation, so concurrent submissions cannot both take the last place."""
        tenant, priority, quota = job.tenant_id, job.priority_class, job.monthly_images
        used = await self._month_usage(tenant) if quota else 0
        with span(
            "admission",
            parent=job.params.get("trace_context"),
            tenant=tenant,
            priority_class=priority,
            images=images,
        ):
            self.admission.admit(
                tenant,
                priority,
                jobs=jobs,
                images=images,
                running=self._active.count(tenant),
                cap=job.max_concurrent_jobs,
                quota=quota,
                used=used,
                now=self.clock(),
                today=utcnow(),
                check_queue=check_queue,
            )
        try:
            yield
        finally:
            self.admission.release(tenant, priority, jobs=jobs, images=images)

    async def _month_usage(self, tenant_id: str) -> int:
        """Images the tenant asked for this month: counted in the store at most every
        ``USAGE_TTL_S`` per tenant, plus what this scheduler admitted since (a count per
        submission would be a join over the month's images on every request)."""
        month = month_start(utcnow())
        cached = self._usage.get(tenant_id)
        if cached is None or cached[1] != month or self.clock() - cached[0] > USAGE_TTL_S:
            used = await asyncio.to_thread(self.store.images_since, tenant_id, month)
            cached = self._usage[tenant_id] = (self.clock(), month, used)
        return cached[2]

    def _count_usage(self, tenant_id: str, images: int) -> None:
        cached = self._usage.get(tenant_id)
        if cached is not None:
            self._usage[tenant_id] = (cached[0], cached[1], cached[2] + images)

    async def submit(self, job: NewJob, *, check_queue: bool = True) -> tuple[JobRow, bool]:
        """Admit, write the job (before queueing), then queue its images. ``(row, created)``."""
        if job.idempotency_key:  # a replay of an accepted request is answered, not admitted again
            existing = await asyncio.to_thread(self.store.find_idempotent, job)
            if existing is not None:
                return existing, False
        images = len(job.seeds)
        async with self._admitted(job, jobs=1, images=images, check_queue=check_queue):
            pool = self.config.pools[self.dispatcher.pool_of(job.priority_class)]
            deadline_s = pool.queue_deadline_s.get(job.priority_class)
            if deadline_s is not None and job.deadline_at is None:
                job.deadline_at = utcnow() + timedelta(seconds=deadline_s)
            row, created = await asyncio.to_thread(self.store.create, job)
            if created:
                self._count_usage(job.tenant_id, images)
                await self._enqueue(row)
        return row, created

    async def submit_many(self, jobs: list[NewJob], batch: BatchRow | None = None) -> list[JobRow]:
        """A bulk batch, admitted as a whole or not at all, like one job: the queue bound and the
        tenant's share of it, one concurrency slot (for all its jobs), the monthly quota. The
        batch row and its jobs are written in one transaction (``BatchExists``: a batch with this
        id or Idempotency-Key was written before), so a refused batch leaves nothing behind."""
        if not jobs:
            return []
        first, images = jobs[0], sum(len(j.seeds) for j in jobs)
        async with self._admitted(first, jobs=1, images=images):
            rows = await asyncio.to_thread(self.store.create_many, jobs, batch)
            self._count_usage(first.tenant_id, images)
            for row in rows:
                await self._enqueue(row)
        return rows

    async def _enqueue(self, row: JobRow) -> None:
        pending = [i for i in row.images if i.status == "pending"]
        if not pending:  # re-queued after its last image was stored: only the finish was missing
            failed = [i for i in row.images if i.status != "done"]
            code = failed[0].error_code if failed else None
            await self._finish(row.id, "failed" if failed else "succeeded", code, "an image failed" if failed else None)
            return
        key = work_key(row)
        now = self.clock()
        deadline = None
        if row.deadline_at is not None:
            deadline = now + (row.deadline_at - utcnow()).total_seconds()
        pool = self.dispatcher.pool_of(row.priority_class)
        position = self.dispatcher.queues[pool].ahead_of_arrival(row.priority_class)
        active = self._active.get(row.id)
        if active is None:
            active = self._active.add(row.id, _Active(row=row, remaining={i.index for i in pending}))
            active.started = row.status == "running"
        for image in pending:
            self.dispatcher.submit(
                WorkItem(
                    job_id=row.id,
                    index=image.index,
                    tenant_id=row.tenant_id,
                    priority=row.priority_class,
                    key=key,
                    seed=image.seed,
                    prompt=row.params["prompt"],
                    negative_prompt=row.params.get("negative_prompt", ""),
                    guidance=row.params["guidance"],
                    input_key=row.params.get("input_key"),
                    created_at=row.created_at,
                    trace_id=row.trace_id,
                    trace_context=row.params.get("trace_context", {}),
                    png_text=row.params.get("png_text"),
                    enqueued_at=now,
                    enqueued_wall_ns=time.time_ns(),
                    deadline=deadline,
                    adopt=row.attempts > 0,
                    inline=row.id in self._inline,
                )
            )
        self._emit(row, "queued", position=position, pool=pool)
        self._wake.set()

    # -- cancellation and waiting -------------------------------------------------------

    async def cancel(self, job_id: str, tenant_id: str) -> JobRow:
        """Queued → cancelled now; running → its images stop at the next step boundary."""
        row = await self._db("cancel", self.store.request_cancel, job_id, tenant_id)
        self.dispatcher.remove_job(job_id)
        active = self._active.get(job_id)
        if row.status == "cancelled":
            self._active.pop(job_id, None)
            self._emit(row, "cancelled", reason="cancelled_by_client")
        elif active is not None and active.inflight:
            self._cancelling.add(job_id)
            ids = [f"{job_id}:{i}" for i in active.inflight]
            self._cancelled_items.update(ids)
            for batch in self._batches.values():
                if any(item.job_id == job_id for item in batch.items):
                    await self.engines.cancel(batch.pool, batch.variant, ids)
        elif active is not None:  # running, but nothing in flight: finish here
            row = await self._finish(job_id, "cancelled", "cancelled_by_client", "cancelled by the client")
        return row

    def cancelled_items(self, item_ids: Iterable[str]) -> set[str]:
        return {i for i in item_ids if i in self._cancelled_items}

    async def wait(self, job_id: str, timeout_s: float) -> JobRow:
        """Block until the job is terminal (synchronous API); its row as it was finished."""
        async with asyncio.timeout(timeout_s):
            async for event in self.hub.subscribe(job_id):
                if event.terminal:
                    if event.row is not None:
                        return event.row
                    break
        return await asyncio.to_thread(self.store.get, job_id)

    async def submit_and_wait(
        self, job: NewJob, wait_s: float, *, inline: bool = False, on_admitted: Callable[[], None] | None = None
    ) -> Submitted:
        """The synchronous APIs' one call: admit and write the job, then wait until it is terminal
        (or ``wait_s`` passes: ``timed_out``, the job goes on). With ``inline`` the PNGs come back
        with it, as the engine handed them over, so the caller need not read them from S3.
        ``on_admitted`` is called once the job is written and queued (the ingress then lets the
        next submission of the class in while this one waits)."""
        if inline:
            self._inline.setdefault(job.id, {})
        try:
            row, created = await self.submit(job)  # an idempotent replay: the earlier job, no PNGs
            if on_admitted is not None:
                on_admitted()
            if row.status in TERMINAL:
                return Submitted(row, created)
            try:
                row = await self.wait(row.id, wait_s)
            except TimeoutError:
                return Submitted(row, created, timed_out=True)
            return Submitted(row, created, pngs=self._inline.get(row.id, {}))
        finally:
            self._inline.pop(job.id, None)

    async def events(self, job_id: str, after: int = 0) -> AsyncIterator[dict[str, Any]]:
        row = await asyncio.to_thread(self.store.get, job_id)
        if row.status in TERMINAL and not self.hub.history(job_id):
            yield {"seq": 1, "type": row.status, "job_id": job_id, "error_code": row.error_code}
            return
        async for event in self.hub.subscribe(job_id, after=after):
            yield event.to_dict()

    # -- dispatching --------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        while self._running:
            decision = self.dispatcher.poll(self.clock())
            for job_id in {i.job_id for i in decision.expired}:
                self._spawn(self._finish(job_id, "failed", "queue_timeout", "waited past its class's queue deadline"))
            self._publish_gauges()
            self._wake_scaled_to_zero()
            batch = decision.batch
            if batch is not None:
                metrics().batch_size.observe(len(batch.items), pool=batch.pool, variant=batch.variant)
                self._batches[batch.id] = batch
                self._holding.add(batch.id)
                self._spawn(self._run_batch(batch), name=f"batch-{batch.id}")
                continue
            self._wake.clear()
            timeout = max(0.0, decision.wake_at - self.clock()) if decision.wake_at is not None else None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    async def _run_batch(self, batch: Batch) -> None:
        try:
            items = await self._claim(batch)
            if items:
                batch.items = items
                self._queue_wait_spans(batch)
                links = [Link(ctx) for item in items if (ctx := span_context_of(item.trace_context)) is not None]
                with tracer().start_as_current_span(
                    "batch",
                    links=links,
                    attributes={
                        "zimage.batch.id": batch.id,
                        "zimage.batch.size": len(items),
                        "zimage.pool": batch.pool,
                        "zimage.variant": batch.variant,
                        "zimage.bucket": batch.key.size,
                        "zimage.steps": batch.key.steps,
                    },
                ):
                    batch.trace_context = carrier()
                    try:
                        outcome = await self.engines.run(
                            batch, self._on_progress, on_released=lambda: self._release_slot(batch)
                        )
                    except Exception as exc:  # replica died, engine error: retried, then failed
                        log.exception("batch %s failed on %s/%s", batch.id, batch.pool, batch.variant)
                        outcome = self._failed_outcome(batch, exc)
                    else:
                        self._count_placement(batch, outcome)
                    self._release_slot(batch)
                    await self._record(batch, outcome)
        finally:
            self._release_slot(batch)
            self._batches.pop(batch.id, None)
            self._wake.set()  # retried items may be back in the queue

    def _count_placement(self, batch: Batch, outcome: BatchOutcome) -> None:
        """Batches placed on a replica; those that ran elsewhere (their replica had gone)."""
        if batch.replica is None:
            return
        self._placed += 1
        if outcome.replica != batch.replica:
            self._rerouted += 1
            log.info("batch %s ran on replica %s, not on %s", batch.id, outcome.replica, batch.replica)

    def _release_slot(self, batch: Batch) -> None:
        """The engine slot is free again (once per batch): the next batch may start while this
        one's results are still being recorded."""
        if batch.id not in self._holding:
            return
        self._holding.discard(batch.id)
        self.dispatcher.done(batch)
        self._wake.set()

    async def _claim(self, batch: Batch) -> list[WorkItem]:
        """Lease the batch's jobs in one transaction (queued → running); items of jobs cancelled,
        finished or held by another scheduler meanwhile are dropped. If the database cannot be
        reached, the items go back to the queue (after a pause) instead of being lost."""
        job_ids = list(dict.fromkeys(i.job_id for i in batch.items))
        try:
            claimed = await self._db("claim", self.store.claim_many, job_ids, self.owner, self.config.scheduler.lease_s)
        except Exception:
            log.exception("cannot lease the jobs of batch %s: their items go back to the queue", batch.id)
            self._spawn(self._requeue_later(batch.items, delay_s=1.0))
            return []
        for row in claimed.cancelled:
            self._active.pop(row.id, None)
            self._emit(row, "cancelled", reason=row.error_code)
        kept: list[WorkItem] = []
        for job_id in job_ids:
            row = claimed.running.get(job_id)
            active = self._active.get(job_id)
            if row is None or active is None:
                if job_id in claimed.held:
                    log.warning("job %s is held by another scheduler's live lease: not running it here", job_id)
                self._active.pop(job_id, None)
                continue
            active.row = row
            # Images stored meanwhile (by a scheduler whose lease lapsed before it finished the
            # job) are not run again; a job with nothing left simply finishes.
            stored = {image.index for image in row.images if image.status == "done"}
            active.remaining -= stored
            job_items = [i for i in batch.items if i.job_id == job_id and i.index not in stored]
            if not job_items:
                if (finish := self._settlement(job_id, active)) is not None:
                    await self._finish(job_id, finish.status, finish.code, finish.message)
                continue
            active.inflight.update(i.index for i in job_items)
            kept += job_items
            if not active.started:
                active.started = True
                self._emit(row, "started", batch_id=batch.id, pool=batch.pool, batch_size=len(batch.items))
        return kept

    async def _requeue_later(self, items: list[WorkItem], delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        for item in items:
            if item.job_id in self._active:
                self.dispatcher.submit(item)
        self._wake.set()

    def _wake_scaled_to_zero(self) -> None:
        """Work waits for an engine deployment with no replica (``min_replicas: 0``): keep one
        wake-up call outstanding, so Serve starts a replica (its heartbeat then brings capacity)."""
        capacity, queues = self.dispatcher.capacity, self.dispatcher.queues
        for pool, variant in self._deployments:
            if capacity.get((pool, variant)) or not queues[pool] or (pool, variant) in self._waking:
                continue
            if not self.dispatcher.load(pool, variant).queued_batches:
                continue
            self._waking.add((pool, variant))
            task = self._spawn(self.engines.wake(pool, variant), name=f"wake-{pool}-{variant}")
            task.add_done_callback(lambda _, key=(pool, variant): self._waking.discard(key))

    def _publish_gauges(self) -> None:
        registry = metrics()
        for pool, queue in self.dispatcher.queues.items():
            for cls, depth in queue.depths().items():
                registry.queue_depth.set(depth, pool=pool, priority_class=cls)
        for (pool, variant), slots in self.dispatcher.capacity.items():
            busy = self.dispatcher.inflight.get((pool, variant), 0)
            registry.engine_slots.set(slots, pool=pool, variant=variant)
            registry.engine_busy.set(busy / slots if slots else 0.0, pool=pool, variant=variant)

    def _queue_wait_spans(self, batch: Batch) -> None:
        """Each image's time in the queue, as a span in its request's trace (and a histogram)."""
        now = time.time_ns()
        for item in batch.items:
            waited = (now - (item.enqueued_wall_ns or now)) / 1e9
            metrics().queue_wait.observe(waited, pool=batch.source_pool or batch.pool, priority_class=item.priority)
            started = tracer().start_span(
                "queue_wait",
                context=context_of(item.trace_context),
                start_time=item.enqueued_wall_ns or now,
                attributes={
                    "zimage.pool": batch.source_pool or batch.pool,
                    "zimage.priority_class": item.priority,
                    "zimage.batch.id": batch.id,
                },
            )
            started.end(end_time=now)

    def _on_progress(self, progress: Progress) -> None:
        for job_id in dict.fromkeys(i.split(":")[0] for i in progress.item_ids):
            active = self._active.get(job_id)
            if active is not None:
                self._emit(active.row, "progress", step=progress.step, total=progress.total, pass_=progress.pass_name)

    @staticmethod
    def _failed_outcome(batch: Batch, exc: Exception) -> BatchOutcome:
        code = getattr(exc, "code", "engine_failed")
        return BatchOutcome(
            batch_id=batch.id,
            replica="unknown",
            engine_s=0.0,
            items=[ItemOutcome(i.item_id, "failed", error_code=code, error_message=str(exc)) for i in batch.items],
        )

    async def _record(self, batch: Batch, outcome: BatchOutcome) -> None:
        """The batch's delivered images (and their bills) and the jobs it completes, in one write.

        If the database cannot take it (after ``scheduler.db_retry_s`` of retries), the jobs are let
        go: nothing of them stays held here (tenant concurrency, leases renewed by the sweep); the
        lease lapses, the sweep re-queues them once the database answers, and the re-run adopts the
        images already in S3 instead of generating (and billing) them twice.
        """
        by_id = {o.item_id: o for o in outcome.items}
        share = outcome.engine_s / max(len(batch.items), 1)
        touched: dict[str, _Active] = {}
        done: list[DoneImage] = []
        for item in batch.items:
            active = self._active.get(item.job_id)
            if active is None:
                continue
            touched[item.job_id] = active
            active.inflight.discard(item.index)
            self._cancelled_items.discard(item.item_id)
            result = by_id.get(item.item_id) or ItemOutcome(item.item_id, "failed", error_code="engine_lost_item")
            if result.status == "done":
                stored = StoredImage(
                    s3_key=result.s3_key or "",
                    sha256=result.sha256 or "",
                    size_bytes=result.size_bytes or 0,
                    timings=result.timings,
                    batch_size=len(batch.items),
                    engine_s=share,
                    replica=outcome.replica,
                )
                entry = self._ledger_entry(batch, outcome, item, result, active.row, share)
                done.append(DoneImage(item.job_id, item.index, stored, entry))
                if result.png is not None and item.job_id in self._inline:
                    self._inline[item.job_id][item.index] = result.png
                active.remaining.discard(item.index)
            elif result.status == "failed":
                tries = active.failures[item.index] = active.failures.get(item.index, 0) + 1
                active.last_error = (result.error_code or "engine_failed", result.error_message or "engine failed")
                if tries < self.config.scheduler.max_attempts and not active.row.cancel_requested:
                    item.enqueued_at = self.clock()
                    item.adopt = True  # the failed attempt may have stored it after all
                    self.dispatcher.submit(item)
        finishes = [f for job_id, active in touched.items() if (f := self._settlement(job_id, active)) is not None]
        try:
            with span("ledger_write", batch_id=batch.id, images=len(done), jobs_finished=len(finishes)):
                recorded = await self._db("record", self.store.record_batch, done, finishes)
        except Exception:
            log.exception("cannot record batch %s: letting its %d jobs go for recovery", batch.id, len(touched))
            for job_id in touched:
                self.dispatcher.remove_job(job_id)
                self._active.pop(job_id, None)
            return
        bucket = self.config.buckets_for(batch.variant).label(batch.key.size)
        for image in done:
            if (image.job_id, image.index) in recorded.recorded:
                metrics().ledger_rows.inc(variant=batch.variant, pool=batch.pool)
                metrics().images.inc(variant=batch.variant, bucket=bucket, pool=batch.pool)
        self.admission.drain.record(self.clock(), len(done))
        for row in recorded.finished.values():
            self._finished(row)

    def _settlement(self, job_id: str, active: _Active) -> Finish | None:
        """How a job whose images are all accounted for ends (``None``: it goes on)."""
        if active.inflight:
            return None
        if not active.remaining:
            return Finish(job_id, "succeeded")
        if active.row.cancel_requested or job_id in self._cancelling:
            return Finish(job_id, "cancelled", "cancelled_by_client", "cancelled by the client")
        if any(n >= self.config.scheduler.max_attempts for n in active.failures.values()):
            code, message = active.last_error or ("engine_failed", "engine failed")
            attempts = self.config.scheduler.max_attempts
            return Finish(job_id, "failed", code, f"{message} (after {attempts} attempts)")
        return None

    def _ledger_entry(
        self, batch: Batch, outcome: BatchOutcome, item: WorkItem, result: ItemOutcome, row: JobRow, share: float
    ) -> LedgerEntry:
        """The image's bill: GPU-seconds = the batch's engine time × the slice's GPU fraction ÷ batch size."""
        pool = self.config.pools[batch.pool]
        return LedgerEntry(
            tenant_id=item.tenant_id,
            job_id=item.job_id,
            image_index=item.index,
            plan=row.plan,
            variant=batch.variant,
            bucket=batch.key.size,
            steps=batch.key.steps,
            backend=outcome.backend,
            pool=batch.pool,
            mig_profile=pool.mig_profile,
            batch_size=len(batch.items),
            gpu_seconds=share * pool.gpu_fraction,
            s3_key=result.s3_key or "",
            sha256=result.sha256 or "",
            size_bytes=result.size_bytes or 0,
            etag=result.etag,
            trace_id=item.trace_id,
            job_created_at=row.created_at,
            delivered_at=utcnow(),
        )

    async def _finish(
        self, job_id: str, status: str, code: str | None = None, message: str | None = None
    ) -> JobRow | None:
        """End one job (cancellation, deadline, recovery); ``None`` if the database would not take it
        (the job is then let go for recovery, as in :meth:`_record`)."""
        try:
            row = await self._db("finish", self.store.finish, job_id, status, code=code, message=message)
        except Exception:
            log.exception("cannot finish job %s as %s: letting it go for recovery", job_id, status)
            self.dispatcher.remove_job(job_id)
            self._active.pop(job_id, None)
            self._unfinished[job_id] = (status, code, message)
            return None
        self._unfinished.pop(job_id, None)
        self._finished(row)
        return row

    def _finished(self, row: JobRow) -> None:
        """A job reached a terminal state in the store: forget it here, count it, announce it."""
        self.dispatcher.remove_job(row.id)
        self._active.pop(row.id, None)
        self._cancelling.discard(row.id)
        metrics().jobs.inc(variant=row.variant, priority_class=row.priority_class, status=row.status)
        if row.finished_at is not None:
            metrics().job_seconds.observe(
                (row.finished_at - row.created_at).total_seconds(),
                variant=row.variant,
                priority_class=row.priority_class,
                status=row.status,
            )
        data: dict[str, Any] = {}
        if row.status == "failed":
            data = {"error_code": row.error_code, "error_message": row.error_message}
        elif row.status == "cancelled":
            data = {"reason": row.error_code}
        self._emit(row, row.status, **data)

    def _emit(self, row: JobRow, type_: str, **data: Any) -> None:
        self.hub.publish(row.id, type_, row=row if type_ in TERMINAL else None, **data)
        for listener in self._listeners:
            try:
                listener(row.id, type_, data, row)
            except Exception:  # a listener must never break scheduling
                log.exception("job listener failed for %s %s", row.id, type_)

    # -- sweeping -----------------------------------------------------------------------

    async def _sweep_loop(self) -> None:
        interval = self.config.scheduler.sweep_interval_s
        while self._running:
            await asyncio.sleep(interval)
            with contextlib.suppress(Exception):
                await self.sweep()

    async def sweep(self) -> None:
        """Renew our leases; re-queue jobs whose owner's lease ran out (a job cancelled meanwhile
        is finished as cancelled by the store); finish the jobs the database refused to finish."""
        ours = [job_id for job_id, a in self._active.items() if a.started]
        await asyncio.to_thread(self.store.renew, ours, self.owner, self.config.scheduler.lease_s)
        for row in await asyncio.to_thread(self.store.requeue_expired):
            if row.status == "cancelled":
                self._active.pop(row.id, None)
                self.dispatcher.remove_job(row.id)
                self._emit(row, "cancelled", reason=row.error_code)
            elif row.id not in self._active:
                await self._enqueue(row)
        for job_id, (status, code, message) in list(self._unfinished.items()):
            await self._finish(job_id, status, code, message)

    # -- observability ------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "owner": self.owner,
            "pools": {
                name: {
                    "queue": queue.depths(),
                    # 0: the pool starts a replica when work for it waits (ready without one).
                    "min_replicas": self.config.pools[name].autoscaling.min_replicas,
                    "engines": {
                        v: {
                            "capacity": self.dispatcher.capacity.get((name, v), 0),
                            "inflight": self.dispatcher.inflight.get((name, v), 0),
                        }
                        for v in self.config.pool_variants(name)
                    },
                }
                for name, queue in self.dispatcher.queues.items()
            },
            "active_jobs": len(self._active),
            "batches_in_flight": len(self._batches),
            "batches_placed": self._placed,
            "batches_rerouted": self._rerouted,
        }
