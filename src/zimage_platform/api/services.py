"""What HTTP handlers may use: the platform's services, assembled once per ingress replica."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

from zimage_platform.config import PlatformConfig
from zimage_platform.scheduling.models import JobRow
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
    async def submit_and_wait(self, job: NewJob, wait_s: float, *, inline: bool = False) -> Submitted: ...
    async def submit_many(self, jobs: list[NewJob]) -> list[str]: ...
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
    async def enter(self, priority_class: str) -> AsyncIterator[None]:
        gate = self._gates.get(priority_class)
        if gate is None:
            yield
            return
        async with gate:
            yield


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
