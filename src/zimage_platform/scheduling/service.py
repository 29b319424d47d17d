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
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Protocol

from opentelemetry.trace import Link

from zimage_platform.billing.ledger import LedgerEntry
from zimage_platform.db import utcnow
from zimage_platform.scheduling.admission import Admission, AdmissionLimit, QueueFull, month_start
from zimage_platform.scheduling.dispatcher import Dispatcher, pool_policies
from zimage_platform.scheduling.events import EventHub
from zimage_platform.scheduling.models import TERMINAL, JobRow
from zimage_platform.scheduling.store import JobStore, NewJob, StoredImage
from zimage_platform.scheduling.work import Batch, BatchOutcome, ItemOutcome, Progress, WorkItem, WorkKey
from zimage_platform.telemetry.metrics import metrics
from zimage_platform.telemetry.tracing import carrier, context_of, span, span_context_of, tracer

if TYPE_CHECKING:
    from zimage_platform.config import PlatformConfig

log = logging.getLogger(__name__)

__all__ = ["AdmissionLimit", "EngineClient", "QueueFull", "SchedulerService", "month_start", "work_key"]


class EngineClient(Protocol):
    """How the scheduler reaches engine replicas (Ray handles, or engines in this process)."""

    async def run(self, batch: Batch, on_progress: Callable[[Progress], None]) -> BatchOutcome: ...

    async def cancel(self, pool: str, variant: str, item_ids: list[str]) -> None: ...


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
class _Active:
    """A job with images queued or in flight, as this scheduler sees it."""

    row: JobRow
    remaining: set[int]
    inflight: set[int] = field(default_factory=set)
    failures: dict[int, int] = field(default_factory=dict)
    started: bool = False
    last_error: tuple[str, str] | None = None


class _ActiveJobs:
    """Jobs with images queued or in flight, with a count per tenant: the concurrency cap is
    checked on every submission, so it must not scan every active job."""

    def __init__(self) -> None:
        self._jobs: dict[str, _Active] = {}
        self._per_tenant: dict[str, int] = {}

    def add(self, job_id: str, active: _Active) -> _Active:
        if job_id not in self._jobs:
            tenant = active.row.tenant_id
            self._per_tenant[tenant] = self._per_tenant.get(tenant, 0) + 1
        self._jobs[job_id] = active
        return active

    def pop(self, job_id: str, default: _Active | None = None) -> _Active | None:
        active = self._jobs.pop(job_id, None)
        if active is None:
            return default
        tenant = active.row.tenant_id
        self._per_tenant[tenant] -= 1
        if not self._per_tenant[tenant]:
            del self._per_tenant[tenant]
        return active

    def get(self, job_id: str) -> _Active | None:
        return self._jobs.get(job_id)

    def count(self, tenant_id: str) -> int:
        return self._per_tenant.get(tenant_id, 0)

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
        self._cancelled_items: set[str] = set()
        self._listeners: list[JobListener] = []
        self._running = False

    # -- setup --------------------------------------------------------------------------

    def add_listener(self, listener: JobListener) -> None:
        """Called for every job event (webhooks, metrics, bulk-batch bookkeeping)."""
        self._listeners.append(listener)

    def set_capacity(self, pool: str, variant: str, batches: int) -> None:
        self.dispatcher.set_capacity(pool, variant, batches)
        self._wake.set()

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Rebuild the queues from the store, then start dispatching and sweeping."""
        self._running = True
        for listener in self._listeners:
            if hasattr(listener, "start"):
                await listener.start()
        await asyncio.to_thread(self.store.requeue_expired)
        for row in await asyncio.to_thread(self.store.queued):
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
        leftover = [job_id for job_id, a in self._active.items() if a.inflight]
        for job_id in leftover:
            await asyncio.to_thread(self._release_lease, job_id)
        for listener in self._listeners:
            if hasattr(listener, "stop"):
                await listener.stop()

    def _release_lease(self, job_id: str) -> None:
        from sqlalchemy import update

        with self.store.session() as s, s.begin():
            s.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.status == "running", JobRow.lease_owner == self.owner)
                .values(status="queued", lease_owner=None, lease_expires_at=None)
            )

    def _spawn(self, coro, name: str | None = None) -> asyncio.Task:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- admission ----------------------------------------------------------------------

    def check_admission(self, priority: str, images: int) -> None:
        """429 ``queue_full`` when the class's queue would pass its bound (nothing is written)."""
        self.admission.check_queue(priority, images, self.clock())

    def retry_after(self, pool: str, depth: int) -> int:
        """Seconds until ``depth`` images drain at the recently measured rate."""
        return self.admission.drain.retry_after(depth, self.clock())

    def tenant_jobs(self, tenant_id: str) -> int:
        return self._active.count(tenant_id)

    async def check_tenant(
        self, tenant_id: str, priority: str, *, jobs: int, images: int, cap: int | None, quota: int | None
    ) -> None:
        """The tenant's concurrency cap and monthly image quota, then reserve the room for this
        admission (nothing awaits between the checks and the reservation, so none can race it)."""
        used = await asyncio.to_thread(self.store.images_since, tenant_id, month_start(utcnow())) if quota else 0
        self.admission.check_tenant(
            tenant_id,
            running=self._active.count(tenant_id),
            jobs=jobs,
            images=images,
            cap=cap,
            quota=quota,
            used=used,
            now=self.clock(),
            today=utcnow(),
        )

    def _release(self, tenant_id: str, *, jobs: int, images: int) -> None:
        self.admission.release(tenant_id, jobs=jobs, images=images)

    async def submit(self, job: NewJob, *, check_queue: bool = True) -> tuple[JobRow, bool]:
        """Admit, write the job (before queueing), then queue its images. ``(row, created)``."""
        if job.idempotency_key:  # a replay of an accepted request is answered, not admitted again
            existing = await asyncio.to_thread(self.store.find_idempotent, job)
            if existing is not None:
                return existing, False
        with span(
            "admission",
            parent=job.params.get("trace_context"),
            tenant=job.tenant_id,
            priority_class=job.priority_class,
            images=len(job.seeds),
        ):
            if check_queue:
                self.check_admission(job.priority_class, len(job.seeds))
        images = len(job.seeds)
        await self.check_tenant(
            job.tenant_id,
            job.priority_class,
            jobs=1,
            images=images,
            cap=job.max_concurrent_jobs,
            quota=job.monthly_images,
        )
        try:
            pool = self.config.pools[self.dispatcher.pool_of(job.priority_class)]
            deadline_s = pool.queue_deadline_s.get(job.priority_class)
            if deadline_s is not None and job.deadline_at is None:
                job.deadline_at = utcnow() + timedelta(seconds=deadline_s)
            row, created = await asyncio.to_thread(self.store.create, job)
            if created:
                await self._enqueue(row)
        finally:
            self._release(job.tenant_id, jobs=1, images=images)
        return row, created

    async def submit_many(self, jobs: list[NewJob]) -> list[JobRow]:
        """Bulk batches: admitted as a whole (queue bound and monthly quota; a bulk file is one
        submission, so the concurrency cap does not apply), one transaction for all rows."""
        if not jobs:
            return []
        first, images = jobs[0], sum(len(j.seeds) for j in jobs)
        self.check_admission(first.priority_class, images)
        await self.check_tenant(
            first.tenant_id, first.priority_class, jobs=0, images=images, cap=None, quota=first.monthly_images
        )
        try:
            rows = await asyncio.to_thread(self.store.create_many, jobs)
            for row in rows:
                await self._enqueue(row)
        finally:
            self._release(first.tenant_id, jobs=0, images=images)
        return rows

    async def _enqueue(self, row: JobRow) -> None:
        pending = [i for i in row.images if i.status == "pending"]
        if not pending:
            return
        key = work_key(row)
        now = self.clock()
        deadline = None
        if row.deadline_at is not None:
            deadline = now + (row.deadline_at - utcnow()).total_seconds()
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
                )
            )
        pool = self.dispatcher.pool_of(row.priority_class)
        position = self.dispatcher.queues[pool].position(f"{row.id}:{pending[0].index}")
        self._emit(row, "queued", position=position, pool=pool)
        self._wake.set()

    # -- cancellation and waiting -------------------------------------------------------

    async def cancel(self, job_id: str, tenant_id: str) -> JobRow:
        """Queued → cancelled now; running → its images stop at the next step boundary."""
        row = await asyncio.to_thread(self.store.request_cancel, job_id, tenant_id)
        self.dispatcher.remove_job(job_id)
        active = self._active.get(job_id)
        if row.status == "cancelled":
            self._active.pop(job_id, None)
            self._emit(row, "cancelled", reason="cancelled_by_client")
        elif active is not None and active.inflight:
            ids = [f"{job_id}:{i}" for i in active.inflight]
            self._cancelled_items.update(ids)
            for batch in self._batches.values():
                if any(item.job_id == job_id for item in batch.items):
                    await self.engines.cancel(batch.pool, batch.variant, ids)
        elif active is not None:  # running, but nothing in flight: finish here
            await self._finish(job_id, "cancelled", "cancelled_by_client", "cancelled by the client")
            row = await asyncio.to_thread(self.store.get, job_id)
        return row

    def cancelled_items(self, item_ids: Iterable[str]) -> set[str]:
        return {i for i in item_ids if i in self._cancelled_items}

    async def wait(self, job_id: str, timeout_s: float) -> JobRow:
        """Block until the job is terminal (synchronous API)."""
        async with asyncio.timeout(timeout_s):
            async for event in self.hub.subscribe(job_id):
                if event.terminal:
                    break
        return await asyncio.to_thread(self.store.get, job_id)

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
            batch = decision.batch
            if batch is not None:
                metrics().batch_size.observe(len(batch.items), pool=batch.pool, variant=batch.variant)
                self._batches[batch.id] = batch
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
                        outcome = await self.engines.run(batch, self._on_progress)
                    except Exception as exc:  # replica died, engine error: retried, then failed
                        log.exception("batch %s failed on %s/%s", batch.id, batch.pool, batch.variant)
                        outcome = self._failed_outcome(batch, exc)
                    await self._record(batch, outcome)
        finally:
            self._batches.pop(batch.id, None)
            self.dispatcher.done(batch)
            self._wake.set()

    async def _claim(self, batch: Batch) -> list[WorkItem]:
        """Lease each job (queued → running); drop items of jobs cancelled meanwhile."""
        kept: list[WorkItem] = []
        for job_id in dict.fromkeys(i.job_id for i in batch.items):
            active = self._active.get(job_id)
            row = await asyncio.to_thread(self.store.claim, job_id, self.owner, self.config.scheduler.lease_s)
            if row is None or active is None:
                self._active.pop(job_id, None)
                continue
            active.row = row
            job_items = [i for i in batch.items if i.job_id == job_id]
            active.inflight.update(i.index for i in job_items)
            kept += job_items
            if not active.started:
                active.started = True
                self._emit(row, "started", batch_id=batch.id, pool=batch.pool, batch_size=len(batch.items))
        return kept

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
        by_id = {o.item_id: o for o in outcome.items}
        share = outcome.engine_s / max(len(batch.items), 1)
        touched: dict[str, _Active] = {}
        done = 0
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
                with span("ledger_write", job_id=item.job_id, image_index=item.index):
                    if await asyncio.to_thread(self.store.record_image, item.job_id, item.index, stored, entry):
                        metrics().ledger_rows.inc(variant=batch.variant, pool=batch.pool)
                        bucket = self.config.buckets_for(batch.variant).label(batch.key.size)
                        metrics().images.inc(variant=batch.variant, bucket=bucket, pool=batch.pool)
                active.remaining.discard(item.index)
                done += 1
            elif result.status == "failed":
                tries = active.failures[item.index] = active.failures.get(item.index, 0) + 1
                active.last_error = (result.error_code or "engine_failed", result.error_message or "engine failed")
                if tries < self.config.scheduler.max_attempts and not active.row.cancel_requested:
                    item.enqueued_at = self.clock()
                    self.dispatcher.submit(item)
        self.admission.drain.record(self.clock(), done)
        for job_id, active in touched.items():
            await self._settle(job_id, active)

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

    async def _settle(self, job_id: str, active: _Active) -> None:
        """Finish a job whose images are all accounted for."""
        if active.inflight:
            return
        if not active.remaining:
            await self._finish(job_id, "succeeded")
            return
        row = await asyncio.to_thread(self.store.get, job_id)
        active.row = row
        if row.cancel_requested:
            await self._finish(job_id, "cancelled", "cancelled_by_client", "cancelled by the client")
        elif any(n >= self.config.scheduler.max_attempts for n in active.failures.values()):
            code, message = active.last_error or ("engine_failed", "engine failed")
            attempts = self.config.scheduler.max_attempts
            await self._finish(job_id, "failed", code, f"{message} (after {attempts} attempts)")

    async def _finish(self, job_id: str, status: str, code: str | None = None, message: str | None = None) -> None:
        self.dispatcher.remove_job(job_id)
        self._active.pop(job_id, None)
        row = await asyncio.to_thread(self.store.finish, job_id, status, code=code, message=message)
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
        self.hub.publish(row.id, type_, **data)
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
        """Renew our leases; re-queue jobs whose owner's lease ran out; fail expired deadlines."""
        ours = [job_id for job_id, a in self._active.items() if a.started]
        await asyncio.to_thread(self.store.renew, ours, self.owner, self.config.scheduler.lease_s)
        for row in await asyncio.to_thread(self.store.requeue_expired):
            if row.id not in self._active:
                await self._enqueue(row)

    # -- observability ------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "owner": self.owner,
            "pools": {
                name: {
                    "queue": queue.depths(),
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
        }
