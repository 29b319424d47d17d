"""What HTTP handlers may use: the platform's services, assembled once per ingress replica."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from zimage_platform.config import PlatformConfig
from zimage_platform.scheduling.store import JobStore, NewJob
from zimage_platform.storage.results import ResultStore
from zimage_platform.tenancy import TenantRegistry
from zimage_platform.tenancy.audit import AuditLog
from zimage_platform.tenancy.policy import PolicyRegistry
from zimage_platform.tenancy.ratelimit import TenantRateLimiter


class SchedulerClient(Protocol):
    """The scheduler as the ingress sees it (over a Ray handle, or in this process)."""

    async def submit(self, job: NewJob, *, check_queue: bool = True) -> tuple[str, bool]: ...
    async def submit_many(self, jobs: list[NewJob]) -> list[str]: ...
    async def cancel(self, job_id: str, tenant_id: str) -> None: ...
    async def wait(self, job_id: str, timeout_s: float) -> None: ...
    def events(self, job_id: str, after: int = 0) -> AsyncIterator[dict[str, Any]]: ...
    async def status(self) -> dict[str, Any]: ...


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
