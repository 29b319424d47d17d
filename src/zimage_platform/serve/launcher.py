"""``zimage-platform serve``: the whole platform on this machine, loopback only.

Starts (and, on Ctrl-C, stops) only what it started: a local Ray, an embedded SeaweedFS S3
with its own credentials, the SQLite job database; builds the tiny checkpoint and engines if
they are missing; deploys the Serve app; prints the URL and a demo API key.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable

import httpx
import yaml

from zimage_platform.config import PlatformConfig
from zimage_platform.console import BuildProgress, build_log, library_output_to
from zimage_platform.storage.embedded import SERVE, embedded_s3, is_embedded, secret_file

RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
DEMO_TENANT = "demo"


def demo_key(config: PlatformConfig) -> str:
    """The embedded default's demo tenant and its key (kept raw only in this local data folder)."""
    from datetime import UTC, datetime

    from zimage_platform.tenancy import issue_key, load_pepper

    key_file = config.paths.data_dir / "secrets" / "demo-api-key"
    tenant_file = config.paths.data_dir / "tenants" / f"{DEMO_TENANT}.yaml"
    if key_file.is_file() and tenant_file.is_file():
        return key_file.read_text().strip()
    issued = issue_key(load_pepper(config.tenancy.key_pepper, config.key_pepper_file))
    tenant_file.parent.mkdir(parents=True, exist_ok=True)
    record = {"id": issued.key_id, "hash": issued.hash, "created_at": datetime.now(UTC).isoformat(), "label": "demo"}
    tenant_file.write_text(
        yaml.safe_dump(
            {
                "id": DEMO_TENANT,
                "display_name": "Demo tenant (embedded default)",
                "plan": "demo",
                "priority_class": "standard",
                "api_keys": [record],
            }
        )
    )
    key_file.unlink(missing_ok=True)
    return secret_file(key_file, lambda: issued.raw)


def prepare_engines(config: PlatformConfig, log: Callable[[str], None] = print) -> None:
    """Tiny checkpoint and compiled engines, built once (later starts reuse them): a progress bar
    on the terminal, and whatever torch / ONNX export print goes to :func:`build_log`. Nothing for
    the benchmarks-only simulated engine, which loads no model."""
    from zimage_platform.engines.engine import SIMULATED

    backend = config.engine.backend
    if backend == SIMULATED:
        return
    tiny = any(spec.checkpoint == "tiny" for spec in config.variants.values())
    started = time.monotonic()
    try:
        with library_output_to(build_log(config)) as terminal:
            from zimage_platform.engines import build_engine, is_compiled
            from zimage_platform.pipeline.tiny import init_tiny_checkpoint

            variants = list(config.variants) if is_compiled(backend) else []
            with BuildProgress(terminal, int(tiny) + len(variants)) as progress:
                if tiny:
                    progress.step("tiny checkpoint")
                    init_tiny_checkpoint(config.paths.tiny_checkpoint)
                for variant in variants:
                    progress.step(f"{backend} engine: {variant}")
                    build_engine(config, variant, backend)
    except BaseException:
        log(f"preparing engines failed; the libraries' output is in {build_log(config)}")
        raise
    log(f"engines ready ({backend}: {', '.join(config.variants)}) in {time.monotonic() - started:.0f} s")


def init_local_ray(num_cpus: int | None, env: dict[str, str], *, metrics_port: int | None = None) -> None:
    """A single-node Ray on loopback only, no dashboard, quiet; ``env`` reaches every replica
    (S3 credentials, RAY_* switches). The platform's launcher, the benchmarks and the tests all
    start it so.

    Lean: no dashboard UI, and no idle task workers started ahead of time (Ray prestarts one per
    CPU for the driver's tasks; the platform runs actors only, and on two cores each idle worker
    costs memory and background CPU: ``python -m bench idle``). Ray's log monitor and autoscaler
    monitor cannot be switched off through ``ray.init`` (only ``ray start`` has the flags)."""
    import ray

    extra = {"_metrics_export_port": metrics_port} if metrics_port else {}
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": env},
        logging_level="WARNING",
        log_to_driver=False,
        _system_config={"prestart_worker_first_driver": False},
        **extra,
    )


def wait_ready(url: str, timeout_s: float = 600.0) -> dict:
    deadline = time.monotonic() + timeout_s
    last: dict = {}
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{url}/readyz", timeout=5)
            last = response.json()
            if response.status_code == 200:
                return last
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(1.0)
    raise TimeoutError(f"the platform did not become ready in {timeout_s:.0f}s: {json.dumps(last)[:500]}")


class EmbeddedPlatform:
    """Everything ``serve`` starts, in start order; :meth:`stop` ends it in reverse."""

    def __init__(self, config: PlatformConfig, *, ray_cpus: int | None = None) -> None:
        self.config = config
        self.ray_cpus = ray_cpus or max(os.cpu_count() or 2, 4)
        #: What stops in reverse order after Ray: the embedded S3 (and its lock on the data folder).
        self._owned = contextlib.ExitStack()
        self.demo_key = ""
        self.url = f"http://{config.serve.host}:{config.serve.port}"
        self.metrics_url = ""

    def start(self, log: Callable[[str], None] = print) -> PlatformConfig:
        from zimage_platform.serve.components import job_store
        from zimage_platform.tenancy.policy import load_policy_spec

        config = self.config
        # Refused before anything starts: the content policy the replicas will load (a policy file
        # that is named but missing stops here with its reason, not in a replica's log).
        load_policy_spec(config.tenancy.policy_file)
        config.paths.data_dir.mkdir(parents=True, exist_ok=True)
        os.environ.update(RAY_ENV)
        if is_embedded(config):
            log("starting the embedded S3 (SeaweedFS) ...")
            s3 = self._owned.enter_context(embedded_s3(config, owner=SERVE))
            assert s3 is not None
            os.environ.update(s3.environ())
            config = s3.apply(config).model_copy(
                update={
                    "webhooks": config.webhooks.model_copy(update={"allow_private": True}),
                    "limits": config.limits.model_copy(update={"allow_private_urls": True}),
                }
            )
        log(f"preparing engines ({config.engine.backend}) ...")
        if config.engine.backend == "simulated":
            log(
                "WARNING: engine.backend is simulated (benchmarks only): no model is loaded, every image is a "
                f"placeholder and every batch sleeps the time of {config.engine.simulated.latency}"
            )
        prepare_engines(config, log)
        job_store(config, migrate=True)
        self.demo_key = demo_key(config)
        self.config = config
        self._start_ray()
        return config

    def _start_ray(self) -> None:
        from ray import serve

        from zimage_platform.serve.builder import build_app
        from zimage_platform.serve.starting import gate_environ
        from zimage_platform.storage.seaweedfs import free_ports

        if logging.getLogger().getEffectiveLevel() > logging.INFO:  # not --verbose
            # Serve's own INFO lines (its namespace, "connecting to existing app") are not for people.
            logging.getLogger("ray.serve").setLevel(logging.WARNING)

        config = self.config
        metrics_port = config.telemetry.metrics_port or free_ports(1)[0]
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        # Before ray.init, so that Serve's proxy inherits it: from the moment the port answers
        # until the app's ingress runs, requests get 503 platform_starting, not Serve's bare 404.
        os.environ.update(gate_environ(config.serve.route_prefix))
        env = {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "RAY_", "ZIMAGE_"))}
        init_local_ray(self.ray_cpus, env, metrics_port=metrics_port)
        serve.start(http_options={"host": config.serve.host, "port": config.serve.port})
        serve.run(build_app(config), name=config.serve.app_name, route_prefix=config.serve.route_prefix, blocking=False)

    def stop(self) -> None:
        import ray
        from ray import serve

        try:
            if ray.is_initialized():
                # What Ray prints while it tears down (controller tasks retried, actors killed)
                # goes to a log, not the console.
                with library_output_to(self.config.paths.data_dir / "logs" / "shutdown.log"):
                    try:
                        serve.shutdown()
                    finally:
                        ray.shutdown()
        finally:
            self._owned.close()


def run_forever(config: PlatformConfig) -> None:
    """Start everything, print how to use it, and stop everything on Ctrl-C / SIGTERM."""
    platform = EmbeddedPlatform(config)
    stop = threading.Event()
    try:
        platform.start()
        # After ray.init, which installs handlers of its own: ours only ask the main thread to stop.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        key = platform.demo_key
        print("deploying the Serve application (engines load and warm up) ...", flush=True)
        wait_ready(platform.url)
        print(f"\nzimage-platform is ready at {platform.url}  (OpenAPI: {platform.url}/docs)")
        print(f"demo API key: {key}")
        print(f"metrics (Prometheus text; names prefixed ray_, see ops/metrics.md): {platform.metrics_url}\n")
        body = json.dumps({"prompt": "a red fox in fresh snow", "size": "256x256"})
        print("try:")
        print(f"  curl -s {platform.url}/v1/images/generations -H 'Authorization: Bearer {key}' \\")
        print(f"       -H 'Content-Type: application/json' -d '{body}'")
        print("\nCtrl-C stops everything this command started.", flush=True)
        stop.wait()
    finally:
        print("stopping ...", flush=True)
        platform.stop()
