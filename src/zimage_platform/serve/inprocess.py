"""The whole platform in one process, without Ray: the same API, scheduler and engine runners.

For fast API tests and for the overhead benchmark's breakdown; production and the embedded
default run the same parts as Ray Serve deployments (:mod:`zimage_platform.serve.builder`).
"""

from __future__ import annotations

from zimage_platform.api import create_api
from zimage_platform.config import PlatformConfig
from zimage_platform.engines.engine import PipelineEngine
from zimage_platform.scheduling.client import LocalSchedulerClient
from zimage_platform.serve.components import job_store, platform_services, result_store, scheduler_service
from zimage_platform.serve.runner import EngineRunner, LocalEngineClient


class InProcessPlatform:
    def __init__(self, config: PlatformConfig, engines: dict[str, PipelineEngine], *, pool: str | None = None) -> None:
        self.config = config
        pool = pool or next(iter(config.pools))
        results = result_store(config)
        level = config.engine.png_compress_level
        self.runners = {
            (pool, v): EngineRunner(engine, results, png_compress_level=level) for v, engine in engines.items()
        }
        store = job_store(config, migrate=True)
        self.scheduler = scheduler_service(config, LocalEngineClient(self.runners), store=store)
        for p, v in self.runners:
            self.scheduler.set_capacity(p, v, config.pools[p].max_concurrent_batches)
        self.services = platform_services(config, LocalSchedulerClient(self.scheduler), store=store)
        self.app = create_api(self.services)

    async def start(self) -> None:
        self.services.results.ensure_bucket()
        await self.scheduler.start()

    async def stop(self) -> None:
        await self.scheduler.stop()
        await self.services.http.aclose()
