"""One builder assembles the Serve application from one typed config.

The same function serves every way of deploying:

- ``zimage-platform serve`` (the embedded default) calls :func:`build_app`;
- Ray's CLI: ``serve run zimage_platform.serve.builder:app_builder config_path=zimage-platform.yaml``,
  or a Serve config file whose application has ``import_path: zimage_platform.serve.builder:app_builder``
  and ``args: {config: {...}}``;
- the Helm chart renders that Serve config into a KubeRay ``RayService`` (``serveConfigV2``),
  with the platform config inline, validated by the same schema.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application

from zimage_platform.config import PlatformConfig, load_config
from zimage_platform.scheduling.autoscaling import serve_autoscaling_config
from zimage_platform.serve.deployments import Engine, Ingress, Scheduler
from zimage_platform.serve.routing import EngineRouter


def absolute_paths(config: PlatformConfig) -> PlatformConfig:
    """Replicas may run in another working directory: hand them absolute paths."""
    paths = config.paths.model_copy(
        update={name: Path(value).resolve() for name, value in config.paths.model_dump().items()}
    )
    tenancy = config.tenancy.model_copy(
        update={
            "dirs": [Path(d).resolve() for d in config.tenancy.dirs],
            "policy_file": config.tenancy.policy_file and config.tenancy.policy_file.resolve(),
        }
    )
    return config.model_copy(update={"paths": paths, "tenancy": tenancy})


def engine_deployment_name(variant: str, pool: str) -> str:
    return f"Engine-{variant}-{pool}"


def engine_options(config: PlatformConfig, variant: str, pool_name: str) -> dict[str, Any]:
    """Replica resources (CPU here; GPU and MIG custom resources from the pool), batching and scaling."""
    pool = config.pools[pool_name]
    scaling = pool.autoscaling
    options: dict[str, Any] = {
        "name": engine_deployment_name(variant, pool_name),
        "ray_actor_options": {
            "num_cpus": pool.num_cpus,
            "num_gpus": pool.num_gpus,
            "resources": dict(pool.ray_resources),
        },
        # One streaming call per batch. The scheduler starts at most max_concurrent_batches per
        # replica; each may still be storing its images while the next one runs (twice as many).
        "max_ongoing_requests": 2 * pool.max_concurrent_batches,
        # Serve cannot tell a replica that is only storing images from one whose engine is busy:
        # the scheduler places each batch on a replica with a free engine, and this router obeys.
        "request_router_config": {"request_router_class": f"{EngineRouter.__module__}:{EngineRouter.__name__}"},
        "health_check_period_s": config.serve.health_check_period_s,
        "health_check_timeout_s": config.serve.health_check_timeout_s,
        "graceful_shutdown_timeout_s": config.serve.graceful_shutdown_s,
        "graceful_shutdown_wait_loop_s": 1.0,
    }
    if scaling.fixed:
        options["num_replicas"] = scaling.min_replicas
    else:  # queue-aware: scales on the scheduler's backlog, not on Serve's own request count
        options["autoscaling_config"] = serve_autoscaling_config(scaling, pool.max_concurrent_batches)
    return options


def build_app(config: PlatformConfig) -> Application:
    config = absolute_paths(config)
    data = config.model_dump(mode="json")
    engines = {
        f"{pool}/{variant}": serve.deployment(Engine)
        .options(**engine_options(config, variant, pool))
        .bind(data, variant, pool)
        for pool in config.pools
        for variant in config.pool_variants(pool)
    }
    scheduler = (
        serve.deployment(Scheduler)
        .options(
            name="Scheduler",
            num_replicas=1,
            ray_actor_options={"num_cpus": 0},
            max_ongoing_requests=100_000,
            graceful_shutdown_timeout_s=config.serve.graceful_shutdown_s,
        )
        .bind(data, engines)
    )
    return (
        serve.deployment(Ingress)
        .options(
            name="Ingress",
            num_replicas=config.serve.ingress_replicas,
            ray_actor_options={"num_cpus": 0},
            max_ongoing_requests=10_000,
        )
        .bind(data, scheduler)
    )


def app_builder(args: dict[str, Any]) -> Application:
    """Entry point for Ray's CLI and Serve config files: ``config_path=...`` or an inline ``config``."""
    if "config" in args:
        return build_app(PlatformConfig.model_validate(args["config"]))
    return build_app(load_config(args.get("config_path")))
