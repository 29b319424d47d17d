"""What HTTP handlers may use: the platform's services, assembled once per ingress replica."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

from zimage_platform.config import PlatformConfig
from zimage_platform.scheduling.models import BatchRow, JobRow
from zimage_platform.scheduling.service import Submitted
from zimage_platform.scheduling.store import JobStore, NewJob
from zimage_platform.storage.results import ResultStore
from zimage_platform.tenancy import TenantRegistry
from zimage_platform.tenancy.audit import AuditLog
from zimage_platform.tenancy.policy import PolicyRegistry
from zimage_platform.tenancy.ratelimit import TenantRateLimiter


class SchedulerClient(Protocol):
    """The scheduler as the ingress sees it (over a Ray handle, or in this process)."""

    async def submit(self, job: NewJob, *, check_queue: bool = True) -> tuple[JobRow, bool]: ...
    async def submit_and_wait(
        self, job: NewJob, wait_s: float, *, inline: bool = False, on_admitted: Callable[[], None] | None = None
    ) -> Submitted:
        """Admit and write ``job`` (``on_admitted`` is called then), and wait until it is terminal."""
        ...

    async def submit_many(self, jobs: list[NewJob], batch: BatchRow | None = None) -> list[str]:
        """A bulk batch's row and jobs, admitted as a whole, written in one transaction."""
        ...

    async def cancel(self, job_id: str, tenant_id: str) -> None: ...
    async def wait(self, job_id: str, timeout_s: float) -> None: ...
    def events(self, job_id: str, after: int = 0) -> AsyncIterator[dict[str, Any]]: ...
    async def status(self) -> dict[str, Any]: ...


class SubmitGates:
    """Per priority class, how many submissions of this replica are in the write path at once
    (``serve.submit_concurrency``): a lower class's flood queues here, higher classes pass."""

    def __init__(self, limits: Mapping[str, int]) -> None:
        self._gates = {name: asyncio.Semaphore(n) for name, n in limits.items()}

    @asynccontextmanager
    async def enter(self, priority_class: str) -> AsyncIterator[Callable[[], None]]:
        """Hold the class's gate for the block; the yielded ``leave()`` lets it go earlier (once
        the submission is admitted: a synchronous caller then waits for its images outside)."""
        gate = self._gates.get(priority_class)
        if gate is None:
            yield lambda: None
            return
        await gate.acquire()
        held = True

        def leave() -> None:
            nonlocal held
            if held:
                held = False
                gate.release()

        try:
            yield leave
        finally:
            leave()


@dataclass
class PlatformServices:
    config: PlatformConfig
    store: JobStore
    results: ResultStore
    scheduler: SchedulerClient
    tenants: TenantRegistry
    http: httpx.AsyncClient
    rate_limiter: TenantRateLimiter
    policies: PolicyRegistry
    audit: AuditLog
    submit_gates: SubmitGates = field(default_factory=lambda: SubmitGates({}))
