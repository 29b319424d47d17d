"""Ray Serve deployments: thin wrappers that hold the platform's parts on replicas.

- ``Ingress`` (FastAPI, N replicas): HTTP only; reads jobs from the database, asks the scheduler
  to admit, cancel and stream.
- ``Scheduler`` (1 replica): owns the queues, merges batches, leases jobs, records results.
- ``Engine`` (one deployment per variant × pool): loads the engines of its buckets, runs batches,
  stores images in S3. Replicas announce themselves to the scheduler by heartbeat; that is the
  scheduler's capacity.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from zimage_platform.api import create_api
from zimage_platform.config import PlatformConfig
from zimage_platform.errors import PlatformError
from zimage_platform.scheduling.client import SchedulerUnavailable
from zimage_platform.scheduling.models import BatchRow, JobRow
from zimage_platform.scheduling.service import Submitted
from zimage_platform.scheduling.store import NewJob
from zimage_platform.scheduling.work import Batch, BatchOutcome, EngineReleased, Progress, follow
from zimage_platform.serve.components import platform_services, result_store, scheduler_service
from zimage_platform.telemetry.metrics import configure_metrics
from zimage_platform.telemetry.tracing import configure_tracing

log = logging.getLogger(__name__)

HEARTBEAT_S = 2.0
#: A replica not heard from for this long no longer counts as capacity.
HEARTBEAT_TIMEOUT_S = 3 * HEARTBEAT_S
#: The first answer of a streamed ``submit_and_wait``: the job is written and queued.
ADMITTED = "admitted"


def _config(data: dict[str, Any]) -> PlatformConfig:
    return PlatformConfig.model_validate(data)


# -- results over Ray: expected errors travel as data (pickled whole) and are raised again -----
# An exception raised inside a deployment would reach the caller wrapped in Ray's RayTaskError;
# returned as a value it arrives as itself: JobNotFound is still JobNotFound (404), with its
# code, param, choices and Retry-After.


def _ok(value: Any = None) -> dict[str, Any]:
    return {"ok": True, "value": value}


def _err(exc: PlatformError) -> dict[str, Any]:
    return {"ok": False, "error": exc}


def _unwrap(result: dict[str, Any]) -> Any:
    if result["ok"]:
        return result["value"]
    raise result["error"]


# -- engine ---------------------------------------------------------------------------------


class Engine:
    """A variant on one pool's hardware: loads its engine, runs batches, keeps the scheduler informed."""

    async def __init__(self, config: dict[str, Any], variant: str, pool: str) -> None:
        from zimage_platform.engines.engine import create_engine
        from zimage_platform.serve.runner import EngineRunner

        configure_metrics("ray")
        self.config = _config(config)
        configure_tracing(self.config.telemetry, "engine")
        self.variant, self.pool = variant, pool
        context = serve.get_replica_context()
        self.replica = context.replica_id.unique_id
        self.app_name = context.app_name
        device = "cuda" if self.config.pools[pool].num_gpus > 0 else "cpu"
        engine = create_engine(self.config, variant, pool, device=device)
        await asyncio.to_thread(engine.load)
        await asyncio.to_thread(engine.warmup, [engine.spec.defaults.size])
        self.runner = EngineRunner(
            engine,
            result_store(self.config),
            replica=self.replica,
            png_compress_level=self.config.engine.png_compress_level,
        )
        self.slots = self.config.pools[pool].max_concurrent_batches
        self._load: dict[str, float] = {}
        self._last_canary = time.monotonic()
        self._heartbeat = asyncio.create_task(self._beat())

    async def _beat(self) -> None:
        """Tell the scheduler this replica is up (its capacity) until the replica stops."""
        scheduler = serve.get_deployment_handle("Scheduler", self.app_name)
        while True:
            with contextlib.suppress(Exception):
                await scheduler.heartbeat.remote(self.pool, self.variant, self.replica, self.slots)
            await asyncio.sleep(HEARTBEAT_S)

    async def run(self, batch: Batch) -> AsyncIterator[Progress | EngineReleased | BatchOutcome]:
        async for message in self.runner.run(batch):
            yield message

    def cancel(self, item_ids: list[str]) -> None:
        self.runner.cancel(item_ids)

    async def wake(self) -> None:
        """Nothing to do: a call that waits at the handle of a deployment scaled to zero is what
        makes Serve start its first replica (the scheduler sends one while work waits)."""

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metrics: the scheduler's view of this deployment's work
        (batches in flight and the batches its queue would make), which the queue-aware policy
        scales on. The last answer is kept if the scheduler does not reply in time."""
        scheduler = serve.get_deployment_handle("Scheduler", self.app_name)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                self._load = await scheduler.engine_load.remote(self.pool, self.variant)
        return self._load

    async def check_health(self) -> None:
        """Cheap: the engine is loaded; at most every few minutes, and only when idle, a 1-step canary."""
        if self.runner.engine.pipeline is None:
            raise RuntimeError("engine not loaded")
        interval = self.config.engine.canary_interval_s
        if self.runner.busy == 0 and time.monotonic() - self._last_canary > interval:
            await asyncio.to_thread(self.runner.engine.canary)
            self._last_canary = time.monotonic()

    def __del__(self) -> None:
        if hasattr(self, "_heartbeat"):
            self._heartbeat.cancel()


# -- scheduler ------------------------------------------------------------------------------


class RayEngineClient:
    """The scheduler's :class:`EngineClient` over engine deployment handles."""

    def __init__(self, handles: dict[str, DeploymentHandle]) -> None:
        self.handles = handles

    async def run(self, batch: Batch, on_progress, on_released=None) -> BatchOutcome:
        handle = self.handles[f"{batch.pool}/{batch.variant}"]
        return await follow(handle.options(stream=True).run.remote(batch), on_progress, on_released)

    async def cancel(self, pool: str, variant: str, item_ids: list[str]) -> None:
        # Rare, control-plane: every replica hears it; the one running the items stops them.
        await self.handles[f"{pool}/{variant}"].broadcast("cancel", item_ids).results_async()

    async def wake(self, pool: str, variant: str) -> None:
        """Returns once the deployment has a replica (it waits at the handle until then)."""
        await self.handles[f"{pool}/{variant}"].wake.remote()


class Scheduler:
    async def __init__(self, config: dict[str, Any], engines: dict[str, DeploymentHandle]) -> None:
        configure_metrics("ray")
        self.config = _config(config)
        self.service = scheduler_service(self.config, RayEngineClient(engines))
        self._replicas: dict[tuple[str, str], dict[str, tuple[float, int]]] = {}
        self._started = asyncio.create_task(self.service.start())
        self._capacity = asyncio.create_task(self._track_capacity())

    async def _track_capacity(self) -> None:
        await self._started
        while True:
            now = time.monotonic()
            for (pool, variant), replicas in self._replicas.items():
                alive = {r: v for r, v in replicas.items() if now - v[0] < HEARTBEAT_TIMEOUT_S}
                self._replicas[(pool, variant)] = alive
                self.service.set_replicas(pool, variant, {r: slots for r, (_, slots) in alive.items()})
            await asyncio.sleep(HEARTBEAT_S / 2)

    def engine_load(self, pool: str, variant: str) -> dict[str, float]:
        """An engine deployment's work, for its replicas' autoscaling metrics."""
        return self.service.dispatcher.load(pool, variant).metrics()

    def heartbeat(self, pool: str, variant: str, replica: str, slots: int) -> None:
        first = replica not in self._replicas.setdefault((pool, variant), {})
        self._replicas[(pool, variant)][replica] = (time.monotonic(), slots)
        if first:
            known = self._replicas[(pool, variant)]
            self.service.set_replicas(pool, variant, {r: s for r, (_, s) in known.items()})

    async def submit(self, job: NewJob, check_queue: bool = True) -> dict[str, Any]:
        await self._started
        try:
            return _ok(await self.service.submit(job, check_queue=check_queue))
        except PlatformError as exc:
            return _err(exc)

    async def submit_and_wait(self, job: NewJob, wait_s: float, inline: bool = False) -> AsyncIterator[dict[str, Any]]:
        """Streamed: ``ADMITTED`` once the job is written and queued (the ingress then lets its
        class's next submission in), then the :class:`Submitted` (or the refusal)."""
        await self._started
        admitted = asyncio.Event()
        call = asyncio.ensure_future(self.service.submit_and_wait(job, wait_s, inline=inline, on_admitted=admitted.set))
        try:
            signal = asyncio.ensure_future(admitted.wait())
            await asyncio.wait({call, signal}, return_when=asyncio.FIRST_COMPLETED)
            signal.cancel()
            if admitted.is_set():
                yield _ok(ADMITTED)
            try:
                yield _ok(await call)
            except PlatformError as exc:
                yield _err(exc)
        finally:
            call.cancel()  # the caller went away: stop waiting (the job itself goes on)

    async def submit_many(self, jobs: list[NewJob], batch: BatchRow | None = None) -> dict[str, Any]:
        await self._started
        try:
            rows = await self.service.submit_many(jobs, batch)
        except PlatformError as exc:
            return _err(exc)
        return _ok([r.id for r in rows])

    async def cancel(self, job_id: str, tenant_id: str) -> dict[str, Any]:
        try:
            await self.service.cancel(job_id, tenant_id)
        except PlatformError as exc:
            return _err(exc)
        return _ok()

    async def wait(self, job_id: str, timeout_s: float) -> dict[str, Any]:
        try:
            await self.service.wait(job_id, timeout_s)
        except TimeoutError:
            return _ok("timeout")
        return _ok("done")

    async def events(self, job_id: str, after: int = 0) -> AsyncIterator[dict[str, Any]]:
        async for event in self.service.events(job_id, after):
            yield event

    def status(self) -> dict[str, Any]:
        return self.service.status()

    async def check_health(self) -> None:
        if self._started.done() and self._started.exception():
            raise RuntimeError(f"scheduler failed to start: {self._started.exception()}")

    async def __del__(self) -> None:  # graceful shutdown: running batches finish or go back
        with contextlib.suppress(Exception):
            await self.service.stop(grace_s=self.config.serve.graceful_shutdown_s)


@contextlib.contextmanager
def _scheduler_call() -> Iterator[None]:
    """A dead or restarting scheduler replica is :class:`SchedulerUnavailable` (503 with
    Retry-After), not an unexplained 500: Serve starts another one, which recovers the queue
    from the job table."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

    try:
        yield
    except (RayActorError, DeploymentUnavailableError, ReplicaUnavailableError) as exc:
        raise SchedulerUnavailable(f"the scheduler is restarting ({type(exc).__name__})") from None


class RaySchedulerClient:
    """The ingress's :class:`SchedulerClient` over the scheduler deployment's handle."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle

    async def submit(self, job: NewJob, *, check_queue: bool = True) -> tuple[JobRow, bool]:
        with _scheduler_call():
            row, created = _unwrap(await self.handle.submit.remote(job, check_queue))
        return row, created

    async def submit_and_wait(
        self, job: NewJob, wait_s: float, *, inline: bool = False, on_admitted: Callable[[], None] | None = None
    ) -> Submitted:
        with _scheduler_call():
            stream = self.handle.options(stream=True).submit_and_wait.remote(job, wait_s, inline)
            async for message in stream:
                value = _unwrap(message)
                if value == ADMITTED:
                    if on_admitted is not None:
                        on_admitted()
                    continue
                return value
        raise RuntimeError("the scheduler ended submit_and_wait without an answer")

    async def submit_many(self, jobs: list[NewJob], batch: BatchRow | None = None) -> list[str]:
        with _scheduler_call():
            return _unwrap(await self.handle.submit_many.remote(jobs, batch))

    async def cancel(self, job_id: str, tenant_id: str) -> None:
        with _scheduler_call():
            _unwrap(await self.handle.cancel.remote(job_id, tenant_id))

    async def wait(self, job_id: str, timeout_s: float) -> None:
        with _scheduler_call():
            done = _unwrap(await self.handle.wait.remote(job_id, timeout_s))
        if done == "timeout":
            raise TimeoutError(job_id)

    async def events(self, job_id: str, after: int = 0) -> AsyncIterator[dict[str, Any]]:
        with _scheduler_call():
            async for event in self.handle.options(stream=True).events.remote(job_id, after):
                yield event

    async def status(self) -> dict[str, Any]:
        with _scheduler_call():
            return await self.handle.status.remote()


# -- ingress --------------------------------------------------------------------------------


@serve.ingress()
class Ingress:
    def __init__(self, config: dict[str, Any], scheduler: DeploymentHandle) -> None:
        configure_metrics("ray")
        self.config = _config(config)
        self.services = platform_services(self.config, RaySchedulerClient(scheduler))

    def __serve_build_asgi_app__(self):
        return create_api(self.services)
