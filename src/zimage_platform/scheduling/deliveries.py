"""Webhook delivery until delivered or dead-lettered, with one tenant's receiver unable to slow another's.

- **Durable.** Every event is an outbox row (:class:`WebhookDeliveryRow`) before its first
  attempt. An attempt claims the row (its ``next_attempt_at`` becomes a lease), and its outcome
  is written back: delivered; due again after a backoff; or ``dead_letter`` when the receiver
  refused for good or the event is still failing at its ``give_up_at`` (``webhooks.max_age_s``
  after it was queued). Nothing sleeps in memory between attempts, so a restart (or a replica
  lost mid-attempt, once its lease lapses) picks up exactly where the rows say.
- **Isolated.** At most ``per_tenant`` deliveries of one tenant are in flight, each with a short
  total deadline; a tenant at its cap is left out of the next query for due rows, so a slow or
  dead receiver delays only its own tenant's events and never fills the queue others wait in.
- **Recoverable.** A tenant lists its dead letters and redelivers one (``/v1/webhooks/...``):
  the row is due again with a fresh ``give_up_at``, under the same ``webhook-id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, update

from zimage_platform.db import utcnow
from zimage_platform.errors import PlatformError
from zimage_platform.scheduling.models import WebhookDeliveryRow
from zimage_platform.scheduling.store import JobStore
from zimage_platform.scheduling.webhooks import Attempt, RetryPolicy, WebhookEvent, WebhookSender
from zimage_platform.telemetry.metrics import metrics
from zimage_platform.telemetry.tracing import span

log = logging.getLogger(__name__)

#: A claim lasts one attempt's deadline plus this: then another dispatcher may take the row.
LEASE_MARGIN_S = 30.0


class DeliveryNotFound(PlatformError):
    code = "delivery_not_found"
    status = 404


class DeliveryPending(PlatformError):
    code = "delivery_pending"
    status = 409


def event_of(row: WebhookDeliveryRow) -> WebhookEvent:
    """The event a row stores, with its id (the ``webhook-id`` every attempt repeats)."""
    return WebhookEvent(
        type=row.event_type,
        job_id=row.job_id,
        tenant_id=row.tenant_id,
        data={k: v for k, v in row.payload.get("data", {}).items() if k not in ("job_id", "tenant_id")},
        id=row.id,
        created_at=datetime.fromisoformat(row.payload["created_at"]).astimezone(UTC),
    )


class DeliveryOutbox:
    """The outbox's state machine on the jobs database (each method one short transaction)."""

    def __init__(self, store: JobStore, *, max_age_s: float = 86400.0) -> None:
        self.store = store
        self.max_age_s = max_age_s

    def give_up_at(self, row: WebhookDeliveryRow) -> datetime:
        return row.give_up_at or row.created_at + timedelta(seconds=self.max_age_s)

    def row_for(
        self, event: WebhookEvent, url: str, *, trace: dict[str, str] | None = None, now: datetime | None = None
    ) -> WebhookDeliveryRow:
        """The outbox row of a new event: pending, due now, given up on ``max_age_s`` from now."""
        now = now or utcnow()
        return WebhookDeliveryRow(
            id=event.id,
            job_id=event.job_id,
            tenant_id=event.tenant_id,
            url=url,
            event_type=event.type,
            payload={"data": event.data, "created_at": event.created_at.isoformat(), "trace_context": trace},
            status="pending",
            attempts=0,
            created_at=now,
            give_up_at=now + timedelta(seconds=self.max_age_s),
        )

    def add(self, row: WebhookDeliveryRow) -> None:
        self.store.add_delivery(row)

    def due(
        self, now: datetime, *, exclude_tenants: Collection[str] = (), limit: int = 200
    ) -> list[WebhookDeliveryRow]:
        """Pending rows whose time has come, oldest first, leaving out tenants with no room."""
        q = select(WebhookDeliveryRow).where(
            WebhookDeliveryRow.status == "pending",
            or_(WebhookDeliveryRow.next_attempt_at.is_(None), WebhookDeliveryRow.next_attempt_at <= now),
        )
        if exclude_tenants:
            q = q.where(WebhookDeliveryRow.tenant_id.not_in(list(exclude_tenants)))
        with self.store.session() as s:
            return list(s.scalars(q.order_by(WebhookDeliveryRow.created_at).limit(limit)))

    def claim(self, row_id: str, now: datetime, until: datetime) -> bool:
        """Take a due row for one attempt (False: another dispatcher has it, or it is no longer due)."""
        with self.store.session() as s, s.begin():
            result = s.execute(
                update(WebhookDeliveryRow)
                .where(
                    WebhookDeliveryRow.id == row_id,
                    WebhookDeliveryRow.status == "pending",
                    or_(WebhookDeliveryRow.next_attempt_at.is_(None), WebhookDeliveryRow.next_attempt_at <= now),
                )
                .values(next_attempt_at=until)
            )
            return result.rowcount == 1

    def record(self, row_id: str, attempt: Attempt, now: datetime, next_attempt_at: datetime | None) -> str:
        """Write an attempt's outcome; returns the row's new status."""
        status = "delivered" if attempt.delivered else "pending" if next_attempt_at else "dead_letter"
        with self.store.session() as s, s.begin():
            s.execute(
                update(WebhookDeliveryRow)
                .where(WebhookDeliveryRow.id == row_id)
                .values(
                    status=status,
                    attempts=WebhookDeliveryRow.attempts + 1,
                    last_status_code=attempt.status_code,
                    last_error=attempt.reason,
                    last_attempt_at=now,
                    next_attempt_at=next_attempt_at,
                    delivered_at=now if attempt.delivered else None,
                )
            )
        return status

    def of_tenant(
        self, tenant_id: str, *, status: str | None = None, limit: int = 50, before: datetime | None = None
    ) -> list[WebhookDeliveryRow]:
        """The tenant's deliveries, newest first (``before``: older than that, to page)."""
        q = select(WebhookDeliveryRow).where(WebhookDeliveryRow.tenant_id == tenant_id)
        if status is not None:
            q = q.where(WebhookDeliveryRow.status == status)
        if before is not None:
            q = q.where(WebhookDeliveryRow.created_at < before)
        with self.store.session() as s:
            return list(s.scalars(q.order_by(WebhookDeliveryRow.created_at.desc()).limit(limit)))

    def get(self, tenant_id: str, row_id: str) -> WebhookDeliveryRow:
        """The tenant's delivery; another tenant's is simply not found."""
        with self.store.session() as s:
            row = s.get(WebhookDeliveryRow, row_id)
        if row is None or row.tenant_id != tenant_id:
            raise DeliveryNotFound(f"no webhook delivery {row_id!r}", param="delivery_id")
        return row

    def redeliver(self, tenant_id: str, row_id: str, now: datetime | None = None) -> WebhookDeliveryRow:
        """Due again now, with a fresh retry window and backoff; same event id. A pending row is
        refused (409): it is being delivered already."""
        now = now or utcnow()
        row = self.get(tenant_id, row_id)
        with self.store.session() as s, s.begin():
            result = s.execute(
                update(WebhookDeliveryRow)
                .where(WebhookDeliveryRow.id == row.id, WebhookDeliveryRow.status != "pending")
                .values(
                    status="pending",
                    attempts=0,  # backoff starts over
                    next_attempt_at=None,
                    delivered_at=None,
                    give_up_at=now + timedelta(seconds=self.max_age_s),
                )
            )
        if result.rowcount != 1:
            raise DeliveryPending(f"webhook delivery {row_id!r} is still being delivered", param="delivery_id")
        return self.get(tenant_id, row_id)


class WebhookDispatcher:
    """Runs due deliveries: one attempt per claim, at most ``per_tenant`` in flight per tenant."""

    def __init__(
        self,
        outbox: DeliveryOutbox,
        sender: WebhookSender,
        secrets: Callable[[str], Sequence[str]],
        *,
        policy: RetryPolicy | None = None,
        per_tenant: int = 4,
        poll_s: float = 1.0,
        batch: int = 200,
    ) -> None:
        self.outbox = outbox
        self.sender = sender
        self.secrets = secrets
        self.policy = policy or RetryPolicy(max_age_s=outbox.max_age_s)
        self.per_tenant = per_tenant
        self.poll_s = poll_s
        self.batch = batch
        self._inflight: set[str] = set()
        self._busy: Counter[str] = Counter()
        self._tasks: set[asyncio.Task] = set()
        self._wake = asyncio.Event()
        self._loop: asyncio.Task | None = None

    async def start(self) -> None:
        """Poll for due rows from now on (the first pass resumes whatever a restart left pending)."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop().create_task(self._run())

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Stop polling and let attempts in flight finish (an unfinished one is retried after its lease)."""
        if self._loop is not None:
            self._loop.cancel()
            await asyncio.gather(self._loop, return_exceptions=True)
            self._loop = None
        await self.drain(timeout_s)
        await self.sender.aclose()

    async def drain(self, timeout_s: float = 10.0) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout_s)

    def wake(self) -> None:
        self._wake.set()

    def offer(self, row: WebhookDeliveryRow) -> bool:
        """Start a fresh row's first attempt now if its tenant has room (else the poller will)."""
        if row.id in self._inflight or self._busy[row.tenant_id] >= self.per_tenant:
            return False
        self._start(row)
        return True

    async def _run(self) -> None:
        while True:
            try:
                await self.dispatch()
            except Exception:  # the database may be away for a moment: try again next tick
                log.exception("webhook dispatch failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_s)
            self._wake.clear()

    async def dispatch(self) -> int:
        """Start every due delivery whose tenant has room; how many started."""
        started = 0
        while True:
            full = [tenant for tenant, n in self._busy.items() if n >= self.per_tenant]
            limit = self.batch + len(self._inflight)
            rows = await asyncio.to_thread(self.outbox.due, utcnow(), exclude_tenants=full, limit=limit)
            now_started = sum(self.offer(row) for row in rows)
            started += now_started
            # A full page may hide other tenants' rows behind one that just filled up: look again.
            if not now_started or len(rows) < limit:
                return started

    def _start(self, row: WebhookDeliveryRow) -> None:
        self._inflight.add(row.id)
        self._busy[row.tenant_id] += 1
        task = asyncio.get_running_loop().create_task(self._deliver(row))
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._done(t, row))

    def _done(self, task: asyncio.Task, row: WebhookDeliveryRow) -> None:
        self._tasks.discard(task)
        self._inflight.discard(row.id)
        was_full = self._busy[row.tenant_id] >= self.per_tenant
        self._busy[row.tenant_id] -= 1
        if self._busy[row.tenant_id] <= 0:
            del self._busy[row.tenant_id]
        if was_full:
            self.wake()  # the tenant has room again: its next due row need not wait for the poll
        if not task.cancelled() and task.exception() is not None:
            log.error("webhook delivery %s crashed", row.id, exc_info=task.exception())

    async def _deliver(self, row: WebhookDeliveryRow) -> None:
        now = utcnow()
        lease = now + timedelta(seconds=self.sender.timeout_s + LEASE_MARGIN_S)
        if not await asyncio.to_thread(self.outbox.claim, row.id, now, lease):
            return
        event = event_of(row)
        trace: dict[str, Any] | None = row.payload.get("trace_context")
        with span("webhook_delivery", parent=trace, event_type=event.type, event_id=event.id, attempt=row.attempts + 1):
            try:
                secrets = await asyncio.to_thread(self.secrets, row.tenant_id)
            except (OSError, ValueError) as exc:
                log.error("webhook secret for tenant %s unavailable: %s", row.tenant_id, exc)
                attempt = Attempt(None, "secret_unavailable")
            else:
                attempt = await self.sender.attempt(row.url, secrets, event)
            now = utcnow()
            retry_at = None
            if not attempt.delivered:
                retry_at = self.policy.next_attempt_at(attempt, row.attempts + 1, now, self.outbox.give_up_at(row))
            status = await asyncio.to_thread(self.outbox.record, row.id, attempt, now, retry_at)
        outcome = {"delivered": "delivered", "pending": "retried", "dead_letter": "failed"}[status]
        metrics().webhooks.inc(event=event.type, outcome=outcome)
        if status == "dead_letter":
            log.warning(
                "webhook %s for job %s (tenant %s) dead-lettered after %d attempts: %s",
                event.id,
                event.job_id,
                row.tenant_id,
                row.attempts + 1,
                attempt.reason,
            )
