"""The real Ray Serve app, started once for these tests (Ray itself once per run)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from services import wait_http_ready as wait_ready
from tenants import add_tenant
from zimage_platform.serve.launcher import RAY_ENV as PLATFORM_RAY_ENV
from zimage_platform.serve.launcher import init_local_ray

RAY_ENV = {
    **PLATFORM_RAY_ENV,
    # Replicas report metrics to the agent every second (default 10 s), so a test sees them soon.
    "RAY_metrics_report_interval_ms": "1000",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def serve_config(config, s3, tmp_path_factory):
    root: Path = tmp_path_factory.mktemp("serve")
    return config.model_copy(
        update={
            "paths": config.paths.model_copy(update={"data_dir": root / "var"}),
            "storage": config.storage.model_copy(update={"endpoint_url": s3.endpoint_url, "bucket": "results"}),
            "database": config.database.model_copy(update={"url": f"sqlite:///{root / 'jobs.db'}"}),
            "webhooks": config.webhooks.model_copy(update={"allow_private": True}),
            "limits": config.limits.model_copy(update={"allow_private_urls": True, "sync_timeout_s": 120}),
            "tenancy": config.tenancy.model_copy(update={"dirs": [root / "tenants"], "reload_s": 0.1}),
            "serve": config.serve.model_copy(update={"port": free_port(), "health_check_period_s": 2.0}),
            "scheduler": config.scheduler.model_copy(update={"sweep_interval_s": 1.0, "lease_s": 10.0}),
        }
    )


@pytest.fixture(scope="session")
def ray_metrics_port() -> int:
    """Where Ray's metrics agent serves every replica's metrics (as the embedded ``serve`` does)."""
    return free_port()


@pytest.fixture(scope="session")
def ray_cluster(serve_config, s3, tiny_checkpoint, ray_metrics_port):
    """One local Ray for the run (loopback only); Serve's HTTP proxy on a free port."""
    os.environ.update(RAY_ENV)
    import ray
    from ray import serve

    env = {**RAY_ENV, "AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key}
    os.environ.update(env)
    init_local_ray(8, env, metrics_port=ray_metrics_port)  # the one the platform's launcher starts
    serve.start(http_options={"host": "127.0.0.1", "port": serve_config.serve.port})
    yield ray
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def serve_keys(serve_config) -> dict[str, str]:
    return {"acme": add_tenant(serve_config, "acme"), "globex": add_tenant(serve_config, "globex")}


@pytest.fixture(scope="session")
def serve_app(ray_cluster, serve_config, serve_keys):
    """The platform as built by ``build_app`` from the typed config, over real HTTP."""
    from ray import serve

    from zimage_platform.engines import build_engine
    from zimage_platform.serve.builder import build_app
    from zimage_platform.serve.components import job_store

    for variant in serve_config.variants:
        build_engine(serve_config, variant, serve_config.engine.backend)
    job_store(serve_config, migrate=True)
    serve.run(build_app(serve_config), name=serve_config.serve.app_name, route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{serve_config.serve.port}"
    wait_ready(url)
    return url
