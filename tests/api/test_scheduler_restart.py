"""A synchronous request whose scheduler replica dies (a fault drill found a 500 for a job that
was then run and billed): the ingress tells "not admitted" (503, retry) from "accepted" (keep
waiting on the restarted scheduler). The replica's death is simulated at the client boundary
(the Ray error it raises is mapped by ``serve.deployments._scheduler_call``, tested below)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from zimage_platform.api.generation import submit_and_wait
from zimage_platform.api.services import SubmitGates
from zimage_platform.db import create_db_engine, upgrade
from zimage_platform.scheduling.client import LocalSchedulerClient, SchedulerUnavailable
from zimage_platform.scheduling.service import SchedulerService
from zimage_platform.scheduling.store import JobStore, NewJob
from zimage_platform.serve.runner import LocalEngineClient
from zimage_platform.tenancy import TenantSpec
from zimage_platform.tenancy.ratelimit import TenantRateLimiter

PARAMS = {"prompt": "a cat", "size": "64x64", "steps": 2, "guidance": 0.0, "sampler": "euler", "shift": 3.0}


class DyingScheduler(LocalSchedulerClient):
    """Dies during ``submit_and_wait`` (after writing the job when ``written``), and is
    unreachable for the first wait after that (Serve still starting the new replica)."""

    def __init__(self, service: SchedulerService, *, written: bool) -> None:
        super().__init__(service)
        self.written = written
        self.waits_refused = 0

    async def submit_and_wait(self, job, wait_s, *, inline=False, on_admitted=None):
        if self.written:
            await self.submit(job)
        raise SchedulerUnavailable("the scheduler is restarting (ActorDiedError)")

    async def wait(self, job_id: str, timeout_s: float) -> None:
        if not self.waits_refused:
            self.waits_refused += 1
            raise SchedulerUnavailable("still restarting")
        await super().wait(job_id, timeout_s)


@pytest.fixture
async def parts(config, tmp_path):
    engine = create_db_engine(f"sqlite:///{tmp_path / 'jobs.db'}")
    upgrade(engine)
    store = JobStore(engine)
    scheduler = SchedulerService(config, store, LocalEngineClient({}))  # no engine: nothing runs
    await scheduler.start()
    yield config, store, scheduler
    await scheduler.stop()
    engine.dispose()


def _services(config, store, client) -> SimpleNamespace:
    return SimpleNamespace(
        config=config, store=store, scheduler=client, rate_limiter=TenantRateLimiter(), submit_gates=SubmitGates({})
    )


async def test_an_accepted_job_is_followed_through_a_scheduler_restart(parts):
    config, store, scheduler = parts
    client = DyingScheduler(scheduler, written=True)
    job = NewJob(tenant_id="acme", variant="turbo", kind="text2img", params=PARAMS, seeds=[1])

    async def restarted_scheduler_finishes() -> None:
        await asyncio.sleep(0.3)
        await asyncio.to_thread(store.finish, job.id, "succeeded")

    finisher = asyncio.create_task(restarted_scheduler_finishes())
    tenant = TenantSpec(id="acme", display_name="A")
    async with asyncio.timeout(30):
        submitted = await submit_and_wait(_services(config, store, client), tenant, job)
    await finisher
    assert submitted.row.id == job.id and submitted.row.status == "succeeded" and not submitted.timed_out
    assert client.waits_refused == 1  # it kept trying while the scheduler was away


async def test_a_job_never_written_is_a_503_to_retry(parts):
    config, store, scheduler = parts
    client = DyingScheduler(scheduler, written=False)
    job = NewJob(tenant_id="acme", variant="turbo", kind="text2img", params=PARAMS, seeds=[1])
    with pytest.raises(SchedulerUnavailable) as refused:
        await submit_and_wait(_services(config, store, client), TenantSpec(id="acme", display_name="A"), job)
    assert refused.value.status == 503 and refused.value.retry_after_s > 0
    assert store.queued() == []


def test_a_dead_scheduler_replica_is_scheduler_unavailable():
    from ray.exceptions import ActorDiedError

    from zimage_platform.serve.deployments import _scheduler_call

    with pytest.raises(SchedulerUnavailable), _scheduler_call():
        raise ActorDiedError()


async def test_an_async_submission_written_before_the_death_is_accepted(parts):
    from zimage_platform.api.generation import submit

    config, store, scheduler = parts

    class DiesAfterWriting(LocalSchedulerClient):
        async def submit(self, job, *, check_queue=True):
            await super().submit(job, check_queue=check_queue)
            raise SchedulerUnavailable("the scheduler is restarting (ActorDiedError)")

    job = NewJob(tenant_id="acme", variant="turbo", kind="text2img", params=PARAMS, seeds=[1])
    services = _services(config, store, DiesAfterWriting(scheduler))
    row, created = await submit(services, TenantSpec(id="acme", display_name="A"), job)
    assert row.id == job.id and created
