"""The scheduler as a :class:`~zimage_platform.api.services.SchedulerClient`, in this process."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from zimage_platform.errors import PlatformError
from zimage_platform.scheduling.models import BatchRow, JobRow
from zimage_platform.scheduling.service import SchedulerService, Submitted
from zimage_platform.scheduling.store import NewJob


class SchedulerUnavailable(PlatformError):
    """The scheduler could not be reached (its replica died and Serve is starting another).
    Nothing was admitted by the failed call unless the job's row exists: retry after a moment."""

    code = "scheduler_unavailable"
    status = 503

    def __init__(self, message: str, *, retry_after_s: int = 5) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class LocalSchedulerClient:
    def __init__(self, service: SchedulerService) -> None:
        self.service = service

    async def submit(self, job: NewJob, *, check_queue: bool = True) -> tuple[JobRow, bool]:
        return await self.service.submit(job, check_queue=check_queue)

    async def submit_and_wait(
        self, job: NewJob, wait_s: float, *, inline: bool = False, on_admitted: Callable[[], None] | None = None
    ) -> Submitted:
        return await self.service.submit_and_wait(job, wait_s, inline=inline, on_admitted=on_admitted)

    async def submit_many(self, jobs: list[NewJob], batch: BatchRow | None = None) -> list[str]:
        return [row.id for row in await self.service.submit_many(jobs, batch)]

    async def cancel(self, job_id: str, tenant_id: str) -> None:
        await self.service.cancel(job_id, tenant_id)

    async def wait(self, job_id: str, timeout_s: float) -> None:
        await self.service.wait(job_id, timeout_s)

    async def events(self, job_id: str, after: int = 0) -> AsyncIterator[dict[str, Any]]:
        async for event in self.service.events(job_id, after):
            yield event

    async def status(self) -> dict[str, Any]:
        return self.service.status()
