"""Submit gates: a lower class's flood of submissions waits at the ingress while higher classes pass."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from zimage_platform.api.generation import submit_and_wait
from zimage_platform.api.services import SubmitGates
from zimage_platform.config import ServeConfig
from zimage_platform.db import create_db_engine, upgrade
from zimage_platform.scheduling.client import LocalSchedulerClient
from zimage_platform.scheduling.service import SchedulerService
from zimage_platform.scheduling.store import JobStore, NewJob
from zimage_platform.serve.runner import LocalEngineClient
from zimage_platform.tenancy import TenantSpec
from zimage_platform.tenancy.ratelimit import TenantRateLimiter


async def test_a_bulk_flood_waits_at_its_gate_while_realtime_passes():
    gates = SubmitGates({"bulk": 1})
    release = asyncio.Event()
    entered: list[str] = []

    async def submit(name: str, priority_class: str) -> None:
        async with gates.enter(priority_class):
            entered.append(name)
            if priority_class == "bulk":
                await release.wait()

    flood = [asyncio.create_task(submit(f"bulk{i}", "bulk")) for i in range(3)]
    await asyncio.sleep(0.01)
    await asyncio.wait_for(submit("realtime", "realtime"), timeout=1)
    assert entered == ["bulk0", "realtime"]  # one bulk submission in the write path, the rest wait
    release.set()
    await asyncio.gather(*flood)
    assert entered == ["bulk0", "realtime", "bulk1", "bulk2"]  # nothing dropped, FIFO within the class


def test_the_default_gates_leave_realtime_unlimited():
    limits = ServeConfig().submit_concurrency
    assert "realtime" not in limits and limits["bulk"] < limits["standard"]


def test_a_gate_of_zero_is_refused_at_config_load():
    """A zero gate would hold a class's submissions forever: the config refuses it, naming the field."""
    with pytest.raises(ValidationError, match=r"submit_concurrency\.bulk"):
        ServeConfig(submit_concurrency={"bulk": 0})


async def test_a_synchronous_request_leaves_the_gate_once_admitted(config, tmp_path):
    """Regression (a benchmark): ``submit_and_wait`` held the class's gate for the whole wait, so
    bulk requests queued at the ingress (gate 4) while the engines were idle. The gate now covers
    the admission only: with a gate of 1, a second synchronous request is admitted (its job
    written and queued) while the first still waits for its images."""
    engine = create_db_engine(f"sqlite:///{tmp_path / 'jobs.db'}")
    upgrade(engine)
    store = JobStore(engine)
    scheduler = SchedulerService(config, store, LocalEngineClient({}))  # no engine: nothing finishes
    await scheduler.start()
    services = SimpleNamespace(
        config=config,
        store=store,
        scheduler=LocalSchedulerClient(scheduler),
        rate_limiter=TenantRateLimiter(),
        submit_gates=SubmitGates({"standard": 1}),
    )
    tenant = TenantSpec(id="acme", display_name="Acme")
    params = {"prompt": "a cat", "size": "64x64", "steps": 2, "guidance": 0.0, "sampler": "euler", "shift": 3.0}

    def job() -> NewJob:
        return NewJob(tenant_id="acme", variant="turbo", kind="text2img", params=params, seeds=[1])

    waits = [asyncio.create_task(submit_and_wait(services, tenant, job())) for _ in range(2)]
    try:
        async with asyncio.timeout(10):
            while len(await asyncio.to_thread(store.queued)) < 2:
                await asyncio.sleep(0.05)
        assert not any(w.done() for w in waits)  # both admitted; the first is still waiting
    finally:
        for w in waits:
            w.cancel()
        await asyncio.gather(*waits, return_exceptions=True)
        await scheduler.stop()
        engine.dispose()
