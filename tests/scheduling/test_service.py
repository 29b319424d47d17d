"""The scheduler end to end in one process: real engines (torch, tiny checkpoint), a real S3
(SeaweedFS) and a real database; only Ray is absent (its wiring is tested in tests/serve)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import timedelta

import pytest

from zimage_platform.db import create_db_engine, utcnow
from zimage_platform.scheduling.models import BatchRow
from zimage_platform.scheduling.service import AdmissionLimit, QueueFull, SchedulerService, TenantQueueShare
from zimage_platform.scheduling.store import (
    BatchExists,
    IdempotencyConflict,
    JobNotFound,
    JobStore,
    NewJob,
    StoredImage,
    new_id,
)
from zimage_platform.serve.runner import EngineRunner, LocalEngineClient
from zimage_platform.storage.results import ResultStore

PARAMS = {"prompt": "a cat", "size": "64x64", "steps": 3, "guidance": 0.0, "sampler": "euler", "shift": 3.0}


@pytest.fixture
def results(s3) -> ResultStore:
    return ResultStore("results", endpoint_url=s3.endpoint_url, access_key=s3.access_key, secret_key=s3.secret_key)


@pytest.fixture
def make_scheduler(config, database_url, results, torch_engine, base_torch_engine):
    async def make(capacity: int = 1, **overrides) -> SchedulerService:
        cfg = config.model_copy(update=overrides)
        store = JobStore(create_db_engine(database_url))
        runners = {
            ("cpu", "turbo"): EngineRunner(torch_engine, results),
            ("cpu", "base"): EngineRunner(base_torch_engine, results),
        }
        scheduler = SchedulerService(cfg, store, LocalEngineClient(runners))
        scheduler.set_capacity("cpu", "turbo", capacity)
        scheduler.set_capacity("cpu", "base", capacity)
        await scheduler.start()
        return scheduler

    return make


def job(n: int = 1, **kw) -> NewJob:
    params = {**PARAMS, **kw.pop("params", {})}
    return NewJob(
        tenant_id=kw.pop("tenant", "acme"),
        variant=kw.pop("variant", "turbo"),
        kind="text2img",
        params=params,
        seeds=list(range(100, 100 + n)),
        **kw,
    )


def run(coro):
    return asyncio.run(coro)


def test_a_job_runs_and_its_images_land_in_s3(make_scheduler, results):
    async def go():
        scheduler = await make_scheduler()
        row, _ = await scheduler.submit(job(n=2, trace_id="0af7651916cd43dd8448eb211c80319c"))
        done = await scheduler.wait(row.id, timeout_s=60)
        events = [e.type for e in scheduler.hub.history(row.id)]
        await scheduler.stop()
        return done, events

    done, events = run(go())
    assert done.status == "succeeded" and done.attempts == 1
    assert events[0] == "queued" and events[1] == "started" and events[-1] == "succeeded" and "progress" in events
    for image in done.images:
        assert image.status == "done" and image.s3_key.endswith(f"/{done.id}/{image.index}.png")
        assert image.s3_key.startswith("tenants/acme/")
        head = results.head(image.s3_key)
        assert head.sha256 == image.sha256 and head.size == image.size_bytes
        assert (
            head.metadata["seed"] == str(image.seed) and head.metadata["trace-id"] == "0af7651916cd43dd8448eb211c80319c"
        )
        assert image.timings and image.engine_s > 0


def test_compatible_jobs_are_merged_into_one_batch(make_scheduler):
    async def go():
        scheduler = await make_scheduler()
        # Occupy the engine, then queue four single-image jobs behind it: they merge.
        blocker, _ = await scheduler.submit(job(params={"steps": 8}))
        rows = [(await scheduler.submit(job(params={"prompt": f"cat {i}"})))[0] for i in range(4)]
        done = [await scheduler.wait(r.id, timeout_s=60) for r in [blocker, *rows]]
        await scheduler.stop()
        return done

    blocker, *merged = run(go())
    assert blocker.images[0].batch_size == 1
    assert {r.images[0].batch_size for r in merged} == {4}


def test_cancel_a_queued_job_at_once(make_scheduler):
    async def go():
        scheduler = await make_scheduler()
        blocker, _ = await scheduler.submit(job(params={"steps": 8}))
        waiting, _ = await scheduler.submit(job(params={"size": "128x128"}))
        cancelled = await scheduler.cancel(waiting.id, "acme")
        await scheduler.wait(blocker.id, timeout_s=60)
        await scheduler.stop()
        return cancelled, await asyncio.to_thread(scheduler.store.get, waiting.id)

    cancelled, stored = run(go())
    assert cancelled.status == "cancelled" and stored.images[0].s3_key is None


def test_cancel_a_running_job_at_a_step_boundary(make_scheduler):
    async def go():
        scheduler = await make_scheduler()
        row, _ = await scheduler.submit(job(params={"steps": 16, "size": "256x256"}))
        async for event in scheduler.hub.subscribe(row.id):
            if event.type == "progress" and event.data["step"] >= 2:
                break
        await scheduler.cancel(row.id, "acme")
        done = await scheduler.wait(row.id, timeout_s=60)
        steps = [e.data["step"] for e in scheduler.hub.history(row.id) if e.type == "progress"]
        await scheduler.stop()
        return done, steps

    done, steps = run(go())
    assert done.status == "cancelled" and done.error_code == "cancelled_by_client"
    assert done.images[0].status == "cancelled" and max(steps) < 16


def test_engine_failures_are_retried_then_reported(make_scheduler):
    """An input image that is not in S3 fails on every attempt: retried, then failed with the cause."""

    async def go():
        scheduler = await make_scheduler()
        row, _ = await scheduler.submit(job(params={"input_key": "tenants/acme/missing.png", "strength": 0.5}))
        done = await scheduler.wait(row.id, timeout_s=60)
        await scheduler.stop()
        return done

    done = run(go())
    assert done.status == "failed" and done.error_code in {"object_not_found", "storage_not_found"}
    assert "after 3 attempts" in done.error_message


def test_recovery_requeues_lost_work_without_redoing_stored_images(make_scheduler, database_url):
    store = JobStore(create_db_engine(database_url))
    lost, _ = store.create(job(n=2))
    store.claim(lost.id, "crashed-scheduler", lease_s=0.01)
    image = StoredImage(
        s3_key="tenants/acme/kept.png", sha256="cd" * 32, size_bytes=1, timings=[], batch_size=1, engine_s=0.1
    )
    store.record_image(lost.id, 0, image)
    never_started, _ = store.create(job())

    async def go():
        await asyncio.sleep(0.05)
        scheduler = await make_scheduler()
        results = [await scheduler.wait(j.id, timeout_s=60) for j in (lost, never_started)]
        await scheduler.stop()
        return results

    recovered, started = run(go())
    assert recovered.status == "succeeded" and recovered.attempts == 2
    assert recovered.images[0].s3_key == "tenants/acme/kept.png"  # not regenerated
    assert recovered.images[1].s3_key.endswith("/1.png")
    assert started.status == "succeeded"


def test_queue_bound_rejects_before_writing_and_deadlines_fail_jobs(make_scheduler, config):
    bounds = {"queue_bound": {"realtime": 1, "standard": 2, "bulk": 2}, "tenant_share": {"default": 1.0}}
    pools = {"cpu": config.pools["cpu"].model_copy(update=bounds)}

    async def go():
        scheduler = await make_scheduler(capacity=0, pools=pools)  # no engine: nothing drains
        await scheduler.submit(job(n=2))
        with pytest.raises(QueueFull) as err:
            await scheduler.submit(job())
        late = job(deadline_at=utcnow() + timedelta(milliseconds=200))
        late_row, _ = await scheduler.submit(late, check_queue=False)
        done = await scheduler.wait(late_row.id, timeout_s=10)
        await scheduler.stop()
        return err.value, done

    err, done = run(go())
    assert err.code == "queue_full" and err.retry_after_s >= 1
    assert done.status == "failed" and done.error_code == "queue_timeout"


def test_one_tenant_cannot_fill_a_class_queue_for_everyone(make_scheduler, config):
    """Issue 12: a tenant's waiting images may take its share of the class queue (half by default):
    over it, 429 ``tenant_queue_share`` with Retry-After, while another tenant is still admitted."""
    pools = {"cpu": config.pools["cpu"].model_copy(update={"queue_bound": {"standard": 4}})}

    async def go():
        scheduler = await make_scheduler(capacity=0, pools=pools)  # nothing drains
        await scheduler.submit(job(n=2))  # acme's share: 2 of 4
        with pytest.raises(TenantQueueShare) as over:
            await scheduler.submit(job())
        _, created = await scheduler.submit(job(n=2, tenant="globex"))
        with pytest.raises(QueueFull) as full:
            await scheduler.submit(job(tenant="initech"))
        await scheduler.stop()
        return over.value, created, full.value

    over, created, full = run(go())
    assert over.code == "tenant_queue_share" and over.status == 429 and over.retry_after_s >= 1
    assert "2 images waiting" in over.message and created
    assert full.code == "queue_full"


def _batch(tenant: str = "acme", batch_id: str | None = None) -> BatchRow:
    return BatchRow(
        id=batch_id or new_id("batch"),
        tenant_id=tenant,
        status="running",
        total_rows=1,
        rejected=[],
        created_at=utcnow(),
    )


def test_a_bulk_batch_is_admitted_like_one_job_and_written_in_one_transaction(make_scheduler, config):
    """Issue 12: a batch takes one concurrency slot for all its jobs (it no longer skips the cap);
    a refused batch (cap, queue share) or a duplicate leaves no batch row and no job behind."""
    pools = {"cpu": config.pools["cpu"].model_copy(update={"queue_bound": {"standard": 16}})}

    async def go():
        scheduler = await make_scheduler(capacity=0, pools=pools)
        store = scheduler.store
        batch = _batch()
        rows = await scheduler.submit_many(
            [job(batch_id=batch.id, batch_row=i + 2, max_concurrent_jobs=2) for i in range(3)], batch
        )
        slots = [scheduler.tenant_jobs("acme")]
        with pytest.raises(BatchExists):  # the same batch again: nothing of it is written twice
            await scheduler.submit_many([job(batch_id=batch.id, batch_row=9)], _batch(batch_id=batch.id))
        await scheduler.submit(job(max_concurrent_jobs=2))
        slots.append(scheduler.tenant_jobs("acme"))
        refused = {}
        capped = _batch()
        with pytest.raises(AdmissionLimit) as refused["cap"]:
            await scheduler.submit_many([job(batch_id=capped.id, max_concurrent_jobs=2)], capped)
        too_big = _batch("globex")
        with pytest.raises(TenantQueueShare) as refused["share"]:  # 9 images; globex's share is 8 of 16
            await scheduler.submit_many([job(n=9, tenant="globex", batch_id=too_big.id)], too_big)
        for row in rows:
            await scheduler.cancel(row.id, "acme")
        slots.append(scheduler.tenant_jobs("acme"))
        written = await asyncio.to_thread(store.batch_jobs, batch.id)
        gone = []
        for b in (capped, too_big):
            with pytest.raises(JobNotFound):
                await asyncio.to_thread(store.get_batch, b.id, b.tenant_id)
            gone.append(await asyncio.to_thread(store.batch_jobs, b.id))
        await scheduler.stop()
        return slots, refused, written, gone

    slots, refused, written, gone = run(go())
    assert slots == [1, 2, 1]  # the batch's 3 jobs hold one slot, released when they end
    assert refused["cap"].value.code == "concurrency_limit" and refused["share"].value.code == "tenant_queue_share"
    assert [j.batch_row for j in written] == [2, 3, 4]
    assert gone == [[], []]


def test_submit_and_wait_reports_admission_before_it_waits(make_scheduler):
    """The synchronous path tells its caller once the job is written and queued, so the ingress
    can let the class's next submission in while this one waits for its images."""

    async def go():
        scheduler = await make_scheduler(capacity=0)
        admitted = asyncio.Event()
        waiting = asyncio.create_task(scheduler.submit_and_wait(job(), 60, on_admitted=admitted.set))
        await asyncio.wait_for(admitted.wait(), timeout=10)
        was_waiting = not waiting.done()
        scheduler.set_capacity("cpu", "turbo", 1)
        submitted = await waiting
        await scheduler.stop()
        return was_waiting, submitted

    was_waiting, submitted = run(go())
    assert was_waiting and submitted.row.status == "succeeded"


def test_queueing_behind_a_backlog_costs_the_same_as_into_an_empty_queue(make_scheduler, monkeypatch):
    """A submission's cost must not grow with the backlog (the scheduler's one event loop serves
    every class): telling a four-image job its queue position once scanned the whole class queue
    (the job's later images sit behind its first), so a bulk flood slowed every realtime request.
    Counted, not timed: queue entries looked at while one job joins another tenant's 1,000
    queued images."""
    from zimage_platform.scheduling import queue as queue_module

    async def go():
        scheduler = await make_scheduler(capacity=0)
        backlog, _ = await scheduler.submit(job(n=1, tenant="catalogue"))
        item = next(iter(scheduler.dispatcher.queues["cpu"]._jobs[backlog.id].values()))
        for i in range(1, 1000):
            scheduler.dispatcher.submit(replace(item, index=i))
        looked_at = 0
        alive = queue_module._alive

        def counting(token, entry):
            nonlocal looked_at
            looked_at += 1
            return alive(token, entry)

        monkeypatch.setattr(queue_module, "_alive", counting)
        row, _ = await scheduler.submit(job(n=4, params={"prompt": "behind the backlog"}))
        queued = [e for e in scheduler.hub.history(row.id) if e.type == "queued"]
        monkeypatch.setattr(queue_module, "_alive", alive)
        await scheduler.stop()
        return looked_at, queued

    looked_at, queued = run(go())
    assert queued[0].data["position"] == 1000
    assert looked_at < 50, looked_at


def test_idempotent_submission_queues_once(make_scheduler):
    async def go():
        scheduler = await make_scheduler()
        a, created_a = await scheduler.submit(job(idempotency_key="order-1", request_hash="x"))
        b, created_b = await scheduler.submit(job(idempotency_key="order-1", request_hash="x"))
        with pytest.raises(IdempotencyConflict):
            await scheduler.submit(job(idempotency_key="order-1", request_hash="y"))
        await scheduler.wait(a.id, timeout_s=60)
        await scheduler.stop()
        return a, b, created_a, created_b

    a, b, created_a, created_b = run(go())
    assert a.id == b.id and created_a and not created_b


def test_an_upload_that_keeps_failing_fails_the_job_with_the_reason(config, database_url, torch_engine):
    """S3 unreachable: the store retries, the scheduler retries the batch, then the job fails with the cause."""
    dead = ResultStore(
        "results", endpoint_url="http://127.0.0.1:9", access_key="a", secret_key="b", max_attempts=2, backoff_s=0.01
    )

    async def go():
        store = JobStore(create_db_engine(database_url))
        scheduler = SchedulerService(
            config, store, LocalEngineClient({("cpu", "turbo"): EngineRunner(torch_engine, dead)})
        )
        scheduler.set_capacity("cpu", "turbo", 1)
        await scheduler.start()
        row, _ = await scheduler.submit(job())
        done = await scheduler.wait(row.id, timeout_s=60)
        await scheduler.stop()
        return done

    done = run(go())
    assert done.status == "failed" and done.error_code == "storage_unavailable"
    assert done.images[0].s3_key is None


def test_a_database_outage_while_recording_strands_nothing(config, postgres_url, results, torch_engine):
    """Issue 12, item 5: the database goes away after a batch's image is in S3 but before it is
    recorded. The scheduler retries, then lets the job go (no lease renewed forever, the tenant's
    concurrency released); when the database is back the sweep re-queues it and the re-run adopts
    the stored image: one image, one ledger row, nothing generated twice. A real PostgreSQL outage
    (the test database refuses connections); the engine client only sequences the cut."""
    from sqlalchemy import func, select

    from services import postgres_outage
    from zimage_platform.billing.ledger import LedgerEntryRow
    from zimage_platform.db import upgrade

    engine = create_db_engine(postgres_url)
    upgrade(engine)
    store = JobStore(engine)
    generated: list[str] = []
    outage: list[object] = []

    class CutAfterUpload(LocalEngineClient):
        async def run(self, batch, on_progress, on_released=None):
            outcome = await super().run(batch, on_progress, on_released)
            generated.extend(o.item_id for o in outcome.items if o.timings)  # adopted items have none
            if not outage:
                cut = postgres_outage(postgres_url)
                cut.__enter__()
                outage.append(cut)
            return outcome

    scheduler_config = config.model_copy(
        update={
            "scheduler": config.scheduler.model_copy(
                update={"db_retry_s": 1.0, "lease_s": 1.5, "sweep_interval_s": 0.2}
            )
        }
    )

    async def go():
        scheduler = SchedulerService(
            scheduler_config, store, CutAfterUpload({("cpu", "turbo"): EngineRunner(torch_engine, results)})
        )
        scheduler.set_capacity("cpu", "turbo", 1)
        await scheduler.start()
        row, _ = await scheduler.submit(job(tenant="outage"))
        for _ in range(200):  # the scheduler gives the job up after db_retry_s
            await asyncio.sleep(0.05)
            if outage and scheduler.tenant_jobs("outage") == 0:
                break
        released = scheduler.tenant_jobs("outage")
        outage[0].__exit__(None, None, None)
        done = await scheduler.wait(row.id, timeout_s=60)
        await scheduler.stop()
        return released, done

    released, done = run(go())
    assert released == 0
    assert done.status == "succeeded" and done.attempts == 2
    assert len(generated) == 1  # generated once; the re-run adopted it
    with store.session() as s:
        rows = s.scalar(select(func.count()).select_from(LedgerEntryRow).where(LedgerEntryRow.job_id == done.id))
    assert rows == 1
    assert results.head(done.images[0].s3_key).sha256 == done.images[0].sha256
    engine.dispose()


def test_a_recovered_job_whose_images_are_all_stored_just_finishes(make_scheduler, database_url):
    """Issue 12, item 6: the scheduler died after recording the last image but before finishing
    the job; the re-queued job has nothing left to generate and must finish, not wait forever."""
    store = JobStore(create_db_engine(database_url))
    lost, _ = store.create(job(n=1))
    store.claim(lost.id, "crashed-scheduler", lease_s=0.01)
    kept = StoredImage(
        s3_key="tenants/acme/kept.png", sha256="ef" * 32, size_bytes=1, timings=[], batch_size=1, engine_s=0
    )
    store.record_image(lost.id, 0, kept)

    async def go():
        await asyncio.sleep(0.05)
        scheduler = await make_scheduler()
        done = await scheduler.wait(lost.id, timeout_s=30)
        await scheduler.stop()
        return done

    done = run(go())
    assert done.status == "succeeded" and done.images[0].s3_key == "tenants/acme/kept.png"


def test_a_requeued_job_whose_images_are_all_done_finishes_when_claimed_again(make_scheduler, database_url):
    """Issue 12, item 6: this scheduler queued a job; another one ran it, recorded its image and
    died before finishing it; its lease lapsed and the job is queued again. When this scheduler
    claims it, there is nothing left to generate: the job must succeed with the stored image,
    without running anything again (here a re-run would fail: the job would end failed with its
    image delivered and billed)."""
    store = JobStore(create_db_engine(database_url))
    kept = StoredImage(
        s3_key="tenants/acme/other.png", sha256="ab" * 32, size_bytes=1, timings=[], batch_size=1, engine_s=0
    )

    async def go():
        scheduler = await make_scheduler(capacity=0)  # the job waits in this scheduler's queue
        runs: list[int] = []
        engines = scheduler.engines

        async def lost_replica(batch, *args, **kwargs):
            runs.append(len(batch.items))
            raise RuntimeError("engine replica lost")

        engines.run = lost_replica
        row, _ = await scheduler.submit(job(n=1))
        await asyncio.to_thread(store.claim, row.id, "other-scheduler", 0.01)
        await asyncio.to_thread(store.record_image, row.id, 0, kept)
        requeued = await asyncio.to_thread(store.requeue_expired, utcnow() + timedelta(seconds=1))
        assert [r.status for r in requeued] == ["queued"]
        scheduler.set_capacity("cpu", "turbo", 1)
        done = await scheduler.wait(row.id, timeout_s=30)
        await scheduler.stop()
        return done, runs

    done, runs = run(go())
    assert done.status == "succeeded" and done.images[0].s3_key == "tenants/acme/other.png"
    assert runs == []  # nothing generated again


def _outage_before(store: JobStore, method: str, postgres_url: str, cuts: list) -> None:
    """The database at ``postgres_url`` goes away just before ``store.<method>`` is first called."""
    from services import postgres_outage

    real = getattr(store, method)

    def cut_then_call(*args, **kwargs):
        if not cuts:
            cut = postgres_outage(postgres_url)
            cut.__enter__()
            cuts.append(cut)
        return real(*args, **kwargs)

    setattr(store, method, cut_then_call)


def _outage_config(config):
    fast = {"db_retry_s": 0.5, "lease_s": 1.5, "sweep_interval_s": 0.2}
    return config.model_copy(update={"scheduler": config.scheduler.model_copy(update=fast)})


@pytest.mark.parametrize("step", ["claim_many", "finish"])
def test_a_database_outage_while_claiming_or_finishing_strands_nothing(
    step, config, postgres_url, results, torch_engine
):
    """Issue 12, item 5 (the claim and the finish; the record is tested above): the database goes
    away just before the scheduler leases a batch's jobs, or just before it finishes a recovered
    job whose image is already stored. After the retries give up, the job is let go (the tenant's
    concurrency released); a batch that cannot be leased goes back to the queue (the job is
    still queued in the database: nothing to recover). Once the database answers, the job runs,
    or finishes, all the same."""
    from zimage_platform.db import upgrade

    engine = create_db_engine(postgres_url)
    upgrade(engine)
    store = JobStore(engine)
    tenant = f"outage-{step}"
    kept = StoredImage(
        s3_key="tenants/x/kept.png", sha256="ab" * 32, size_bytes=1, timings=[], batch_size=1, engine_s=0
    )
    cuts: list = []

    async def go():
        scheduler = SchedulerService(
            _outage_config(config), store, LocalEngineClient({("cpu", "turbo"): EngineRunner(torch_engine, results)})
        )
        if step == "claim_many":
            await scheduler.start()
            row, _ = await scheduler.submit(job(tenant=tenant))
        else:  # a job another scheduler stored the image of, then died: recovery only has to finish it
            row, _ = await asyncio.to_thread(store.create, job(tenant=tenant))
            await asyncio.to_thread(store.claim, row.id, "crashed-scheduler", 0.01)
            await asyncio.to_thread(store.record_image, row.id, 0, kept)
            await asyncio.sleep(0.05)
        _outage_before(store, step, postgres_url, cuts)
        scheduler.set_capacity("cpu", "turbo", 1)
        if step == "finish":
            await scheduler.start()
        await asyncio.sleep(1.5)  # the retries (db_retry_s) give up meanwhile
        held = scheduler.tenant_jobs(tenant)
        cuts[0].__exit__(None, None, None)
        done = await scheduler.wait(row.id, timeout_s=30)
        await scheduler.stop()
        return held, done

    held, done = run(go())
    assert cuts and done.status == "succeeded"
    if step == "claim_many":  # still waiting in this scheduler's queue, run once the database is back
        assert held == 1 and done.attempts == 1
    else:  # let go for recovery, then finished without generating anything
        assert held == 0 and done.images[0].s3_key == "tenants/x/kept.png"
    engine.dispose()
