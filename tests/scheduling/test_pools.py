"""Priority classes on pools (CPU replicas standing in for MIG slices): strict priority, and idle
higher pools borrowing lower-class work — with real engines, S3 and database."""

from __future__ import annotations

import asyncio

import pytest

from zimage_platform.config import PoolConfig
from zimage_platform.db import create_db_engine, upgrade
from zimage_platform.scheduling.service import SchedulerService
from zimage_platform.scheduling.store import JobStore, NewJob
from zimage_platform.serve.runner import EngineRunner, LocalEngineClient
from zimage_platform.storage.results import ResultStore

PARAMS = {"prompt": "x", "size": "64x64", "steps": 6, "guidance": 0.0, "sampler": "euler", "shift": 3.0}


@pytest.fixture
def pooled(config, s3, torch_engine, tmp_path):
    pools = {
        "rt": PoolConfig(
            mig_profile="3g.40gb",
            classes=["realtime"],
            variants=["turbo"],
            max_wait_ms={"default": 0},
            max_batch={"default": 2},
        ),
        "std": PoolConfig(
            mig_profile="2g.20gb",
            classes=["standard"],
            variants=["turbo"],
            max_wait_ms={"default": 0},
            max_batch={"default": 2},
        ),
        "bulk": PoolConfig(
            mig_profile="1g.20gb",
            classes=["bulk"],
            variants=["turbo"],
            max_wait_ms={"default": 0},
            max_batch={"default": 2},
        ),
    }
    cfg = config.model_copy(update={"pools": pools})
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    upgrade(create_db_engine(url))
    results = ResultStore("results", endpoint_url=s3.endpoint_url, access_key=s3.access_key, secret_key=s3.secret_key)
    runners = {(p, "turbo"): EngineRunner(torch_engine, results, replica=p) for p in pools}
    scheduler = SchedulerService(cfg, JobStore(create_db_engine(url)), LocalEngineClient(runners))
    for p in pools:
        scheduler.set_capacity(p, "turbo", 1)
    return scheduler


def job(priority: str, prompt: str) -> NewJob:
    return NewJob(
        tenant_id="t",
        variant="turbo",
        kind="text2img",
        params={**PARAMS, "prompt": prompt},
        seeds=[1],
        priority_class=priority,
    )


def test_idle_higher_pools_take_bulk_work_but_realtime_goes_first(pooled: SchedulerService):
    async def go():
        await pooled.start()
        bulk = [(await pooled.submit(job("bulk", f"b{i}")))[0] for i in range(30)]
        await asyncio.sleep(0.05)
        rt, _ = await pooled.submit(job("realtime", "rt"))
        done_rt = await pooled.wait(rt.id, timeout_s=60)
        done_bulk = [await pooled.wait(b.id, timeout_s=60) for b in bulk]
        await pooled.stop()
        return done_rt, done_bulk

    done_rt, done_bulk = asyncio.run(go())
    replicas = {b.images[0].replica for b in done_bulk}
    assert {"rt", "std"} & replicas, replicas  # work-conserving: idle pools lent their engines
    assert done_rt.images[0].replica == "rt"
    started_after = [b for b in done_bulk if b.started_at > done_rt.started_at]
    assert started_after, "bulk work queued before the realtime job must not all start first"
    assert all(b.images[0].batch_size <= 2 for b in done_bulk)  # the pools' batch caps


def test_pool_fit_is_validated_against_slice_memory(config):
    spec = config.variant("turbo").model_copy(update={"memory_gb": {"bf16": 21.7, "fp8": 13.3}})
    variants = {**config.variants, "turbo": spec}
    ok = {
        "bulk": PoolConfig(
            mig_profile="1g.20gb", classes=["realtime", "standard", "bulk"], variants=["turbo"], precision="fp8"
        )
    }
    config.model_validate({**config.model_dump(), "variants": variants, "pools": ok})
    bad = {"bulk": ok["bulk"].model_copy(update={"precision": "bf16"})}
    with pytest.raises(
        ValueError, match=r"cannot hold turbo at bf16: it peaks near 21.7 GB; precisions that fit: \['fp8'\]"
    ):
        config.model_validate({**config.model_dump(), "variants": variants, "pools": bad})
