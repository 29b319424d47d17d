"""Admission control: who gets a 429 before anything is written.

Pure and clock-injected, so the live :class:`~zimage_platform.scheduling.service.SchedulerService`
and the capacity simulator decide exactly alike:

- the class's queue bound (429 ``queue_full``, ``Retry-After`` from the measured drain rate), and
  one tenant's share of it (429 ``tenant_queue_share``: one tenant cannot fill a class queue and
  turn every other tenant of the class away);
- the tenant's concurrency cap (429 ``concurrency_limit``) and monthly image quota
  (429 ``quota_exceeded``);

room (queue places, concurrency slots, quota) is reserved from the check until the job rows are
written and queued, so concurrent admissions cannot both take the last place.

Every check is O(1): it runs on every submission.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from zimage_platform.errors import PlatformError

if TYPE_CHECKING:
    from zimage_platform.config import PoolConfig
    from zimage_platform.scheduling.dispatcher import Dispatcher


class QueueFull(PlatformError):
    code = "queue_full"
    status = 429

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TenantQueueShare(QueueFull):
    """The tenant's waiting images would pass its share of the class queue (``pools.*.tenant_share``)."""

    code = "tenant_queue_share"


class AdmissionLimit(PlatformError):
    """A tenant's concurrency cap or monthly quota (429, nothing is written)."""

    status = 429

    def __init__(self, message: str, *, code: str, retry_after_s: int | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s


def month_start(now: datetime) -> datetime:
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


class DrainRate:
    """Images finished per second over the last ``window_s`` (a running sum: O(1) amortised)."""

    def __init__(self, window_s: float = 60.0) -> None:
        self.window_s = window_s
        self._events: deque[tuple[float, int]] = deque()
        self._total = 0

    def record(self, now: float, images: int) -> None:
        self._events.append((now, images))
        self._total += images
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self._events and now - self._events[0][0] > self.window_s:
            self._total -= self._events.popleft()[1]

    def retry_after(self, depth: int, now: float) -> int:
        """Seconds until ``depth`` images drain at the recently measured rate (5 s when unknown)."""
        self._trim(now)
        if not self._total:
            return 5
        span = max(now - self._events[0][0], 1.0)
        return max(1, min(600, math.ceil(depth / (self._total / span))))


class Admission:
    def __init__(self, pools: Mapping[str, PoolConfig], dispatcher: Dispatcher) -> None:
        self.pools = pools
        self.dispatcher = dispatcher
        self.drain = DrainRate()
        self._reserved_jobs: dict[str, int] = {}
        self._reserved_images: dict[str, int] = {}
        #: Queue places held by admissions in progress: per class (key ``(class, None)``) and per
        #: (class, tenant).
        self._reserved_queue: dict[tuple[str, str | None], int] = {}

    def check_queue(self, priority: str, images: int, now: float, tenant_id: str | None = None) -> None:
        """429 ``tenant_queue_share`` when ``tenant_id``'s waiting images would pass its share of
        the class's queue, 429 ``queue_full`` when the class's queue would pass its bound."""
        pool_name = self.dispatcher.pool_of(priority)
        pool = self.pools[pool_name]
        bound = pool.queue_bound.get(priority)
        if bound is None:
            return
        queue = self.dispatcher.queues[pool_name]
        share = pool.tenant_bound(priority) or bound
        if tenant_id is not None and share < bound:  # a share of 1: the bound itself answers
            mine = queue.tenant_depth(priority, tenant_id) + self._reserved_queue.get((priority, tenant_id), 0)
            if mine + images > share:
                raise TenantQueueShare(
                    f"this tenant has {mine} images waiting in the {priority} queue; one tenant may have "
                    f"{share} of its {bound}",
                    retry_after_s=self.drain.retry_after(mine + images - share, now),
                )
        depth = queue.depth(priority) + self._reserved_queue.get((priority, None), 0)
        if depth + images > bound:
            raise QueueFull(
                f"the {priority} queue is full ({depth} images waiting, bound {bound})",
                retry_after_s=self.drain.retry_after(depth, now),
            )

    def check_tenant(
        self,
        tenant_id: str,
        *,
        running: int,
        jobs: int,
        images: int,
        cap: int | None,
        quota: int | None,
        used: int,
        now: float,
        today: datetime,
    ) -> None:
        """The tenant's concurrency cap (``running``: its slots taken by jobs or bulk batches
        queued or running) and monthly quota (``used``: images this month)."""
        running += self._reserved_jobs.get(tenant_id, 0)
        if cap is not None and jobs and running + jobs > cap:
            raise AdmissionLimit(
                f"{running} jobs are already queued or running; this tenant may have {cap} at once",
                code="concurrency_limit",
                retry_after_s=self.drain.retry_after(1, now),
            )
        if quota is not None and used + self._reserved_images.get(tenant_id, 0) + images > quota:
            next_month = (month_start(today) + timedelta(days=32)).replace(day=1)
            raise AdmissionLimit(
                f"the monthly quota of {quota} images is used up ({used} this month)",
                code="quota_exceeded",
                retry_after_s=int((next_month - today).total_seconds()),
            )

    def admit(
        self,
        tenant_id: str,
        priority: str,
        *,
        jobs: int,
        images: int,
        running: int,
        cap: int | None,
        quota: int | None,
        used: int,
        now: float,
        today: datetime,
        check_queue: bool = True,
    ) -> None:
        """Every check (queue bound and share, concurrency, quota), then reserve the room until
        :meth:`release` (called once the jobs are written and queued, or refused)."""
        if check_queue:
            self.check_queue(priority, images, now, tenant_id)
        self.check_tenant(
            tenant_id, running=running, jobs=jobs, images=images, cap=cap, quota=quota, used=used, now=now, today=today
        )
        self._add(tenant_id, priority, jobs, images)

    def release(self, tenant_id: str, priority: str, *, jobs: int, images: int) -> None:
        self._add(tenant_id, priority, -jobs, -images)

    def _add(self, tenant_id: str, priority: str, jobs: int, images: int) -> None:
        self._reserved_jobs[tenant_id] = self._reserved_jobs.get(tenant_id, 0) + jobs
        self._reserved_images[tenant_id] = self._reserved_images.get(tenant_id, 0) + images
        for key in ((priority, None), (priority, tenant_id)):
            self._reserved_queue[key] = self._reserved_queue.get(key, 0) + images
