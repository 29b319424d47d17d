"""Queue-aware autoscaling on the real Ray Serve: a flood grows an engine deployment from 1 to 3
replicas and idleness shrinks it back; a pool at ``min_replicas: 0`` gets a replica when work
waits for it. Serve's own controller decides, with the platform's policy and the replicas'
custom metrics; the test only submits work and reads ``serve.status()``."""

from __future__ import annotations

import time

import httpx
import pytest

from services import wait_http_ready
from tenants import add_tenant
from zimage_platform.config import AutoscalingConfig, PoolConfig
from zimage_platform.serve.builder import engine_deployment_name

APP, PREFIX = "elastic", "/elastic"


def running_replicas(name: str) -> int:
    from ray import serve
    from ray.serve._private.common import ReplicaState

    app = serve.status().applications.get(APP)
    deployment = app.deployments.get(name) if app else None
    return deployment.replica_states.get(ReplicaState.RUNNING, 0) if deployment else 0


def scheduler_status() -> dict:
    from ray import serve

    return serve.get_deployment_handle("Scheduler", APP).status.remote().result()


def wait_for(condition, timeout_s: float, what: str) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if condition():
            return time.monotonic() - start
        time.sleep(0.25)
    pytest.fail(f"{what} did not happen within {timeout_s:.0f}s")


@pytest.fixture(scope="module")
def elastic(serve_app, serve_config, tmp_path_factory):
    """A second platform app on the run's Ray: an elastic realtime/standard pool of Turbo (1..3
    replicas, one image per batch so a flood outlasts a replica's start-up on 2 shared cores)
    and a bulk pool of Base that starts at zero replicas (no other pool serves Base, so no idle
    engine can borrow its work: only a replica of its own can run it)."""
    from ray import serve

    from zimage_platform.serve.builder import build_app
    from zimage_platform.serve.components import job_store

    root = tmp_path_factory.mktemp("elastic")
    fast = {"upscale_delay_s": 1.0, "downscale_delay_s": 8.0, "look_back_s": 1.0, "metrics_interval_s": 0.5}
    pools = {
        "elastic": PoolConfig(
            classes=["realtime", "standard"],
            variants=["turbo"],
            num_cpus=0.25,
            max_batch={"default": 1},
            autoscaling=AutoscalingConfig(min_replicas=1, max_replicas=3, **fast),
        ),
        "zero": PoolConfig(
            classes=["bulk"],
            variants=["base"],
            num_cpus=0.25,
            autoscaling=AutoscalingConfig(min_replicas=0, max_replicas=1, **fast),
        ),
    }
    config = serve_config.model_copy(
        update={
            "variants": {v: serve_config.variants[v] for v in ("turbo", "base")},
            "pools": pools,
            "database": serve_config.database.model_copy(update={"url": f"sqlite:///{root / 'jobs.db'}"}),
            "tenancy": serve_config.tenancy.model_copy(update={"dirs": [root / "tenants"]}),
            "serve": serve_config.serve.model_copy(update={"app_name": APP, "route_prefix": PREFIX}),
        }
    )
    keys = {
        "standard": add_tenant(config, "shop", limits={"requests_per_minute": 10_000, "concurrent_jobs": 1000}),
        "bulk": add_tenant(config, "catalog", priority_class="bulk"),
    }
    job_store(config, migrate=True)
    serve.run(build_app(config), name=APP, route_prefix=PREFIX, blocking=False)
    url = f"http://127.0.0.1:{config.serve.port}{PREFIX}"
    wait_http_ready(url)
    yield url, keys
    serve.delete(APP)


def submit(url: str, key: str, n: int, size: str, variant: str = "turbo", steps: int = 8) -> list[str]:
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(timeout=30) as http:
        ids = []
        for i in range(n):
            body = {"prompt": f"flood {i}", "size": size, "variant": variant, "steps": steps}
            response = http.post(f"{url}/v1/jobs", json=body, headers=headers)
            assert response.status_code == 202, response.text
            ids.append(response.json()["id"])
        return ids


def all_done(url: str, key: str, ids: list[str]) -> bool:
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(timeout=30) as http:
        statuses = {http.get(f"{url}/v1/jobs/{i}", headers=headers).json()["status"] for i in ids}
    assert not statuses & {"failed", "cancelled"}, statuses
    return statuses == {"succeeded"}


def test_a_flood_adds_replicas_and_idleness_removes_them(elastic):
    url, keys = elastic
    engine = engine_deployment_name("turbo", "elastic")
    assert running_replicas(engine) == 1
    ids = submit(url, keys["standard"], 40, size="512x512")  # ~40 s of work for one replica
    up = wait_for(lambda: running_replicas(engine) == 3, 120, "scaling up to 3 replicas")
    wait_for(lambda: all_done(url, keys["standard"], ids), 300, "the flood finishing")
    # Every batch ran on the replica the scheduler placed it on (one whose engine was free), not
    # where Serve's default router would have sent it.
    status = scheduler_status()
    assert status["batches_placed"] >= len(ids) // 2 and status["batches_rerouted"] == 0, status
    down = wait_for(lambda: running_replicas(engine) == 1, 120, "scaling back down to 1 replica")
    print(f"3 replicas {up:.1f}s after the flood began; back to 1 {down:.1f}s after it drained")


def test_a_pool_at_zero_replicas_gets_one_when_work_waits(elastic):
    url, keys = elastic
    engine = engine_deployment_name("base", "zero")
    assert running_replicas(engine) == 0
    ids = submit(url, keys["bulk"], 1, size="64x64", variant="base", steps=4)
    wait_for(lambda: running_replicas(engine) == 1, 120, "the first replica of a pool at zero")
    wait_for(lambda: all_done(url, keys["bulk"], ids), 120, "the bulk job")
    wait_for(lambda: running_replicas(engine) == 0, 120, "the pool going back to zero")
