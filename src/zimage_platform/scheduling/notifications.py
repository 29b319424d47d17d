"""Job-event listeners: webhooks through a durable outbox, and bulk-batch completion.

Listeners are called synchronously by the scheduler for every job event; anything slow
(database writes, HTTP) is handed to a task so scheduling never waits on a receiver.
"""

from __future__ import annotations

import asyncio
import csv
import io
import logging
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from zimage_platform.db import utcnow
from zimage_platform.scheduling.models import TERMINAL, JobRow, WebhookDeliveryRow
from zimage_platform.scheduling.store import JobStore
from zimage_platform.scheduling.webhooks import ProgressThrottle, WebhookEvent, WebhookSender, generate_secret
from zimage_platform.storage.results import ResultStore
from zimage_platform.telemetry.metrics import metrics
from zimage_platform.telemetry.tracing import span

log = logging.getLogger(__name__)

#: Scheduler event → webhook event type (``queued`` is not sent: the 202 already said so).
WEBHOOK_TYPES = {t: f"job.{t}" for t in ("started", "progress", "succeeded", "failed", "cancelled")}


class DatabaseOutbox:
    """:class:`WebhookOutbox` on the jobs database: the record that survives a restart."""

    def __init__(self, store: JobStore) -> None:
        self.store = store

    def record_attempt(self, event_id: str, status_code: int | None, error: str | None) -> None:
        from sqlalchemy import update

        with self.store.session() as s, s.begin():
            s.execute(
                update(WebhookDeliveryRow)
                .where(WebhookDeliveryRow.id == event_id)
                .values(attempts=WebhookDeliveryRow.attempts + 1, last_status_code=status_code, last_error=error)
            )

    def mark_delivered(self, event_id: str) -> None:
        self.store.update_delivery(event_id, status="delivered", delivered_at=utcnow())

    def mark_failed(self, event_id: str, reason: str) -> None:
        self.store.update_delivery(event_id, status="failed", last_error=reason)


def resolve_secret(ref: str | None, fallback: str) -> str:
    """A tenant's ``webhook_secret_ref`` (``env:VAR`` / ``file:/path``), else the platform secret."""
    if not ref:
        return fallback
    kind, _, where = ref.partition(":")
    value = os.environ.get(where) if kind == "env" else Path(where).read_text().strip()
    if not value:
        raise ValueError(f"webhook secret {ref} is empty or missing")
    return value


def platform_secret(configured: str | None, file: Path) -> str:
    if configured:
        return configured
    if not file.is_file():
        file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(generate_secret())
    return file.read_text().strip()


class WebhookNotifier:
    def __init__(
        self,
        store: JobStore,
        sender: WebhookSender,
        secret_for: Callable[[str], str],
        *,
        throttle: ProgressThrottle | None = None,
    ) -> None:
        self.store = store
        self.sender = sender
        self.secret_for = secret_for
        self.throttle = throttle or ProgressThrottle()
        self._tasks: set[asyncio.Task] = set()

    def __call__(self, job_id: str, type_: str, data: dict[str, Any], row: JobRow) -> None:
        event_type = WEBHOOK_TYPES.get(type_)
        if not row.webhook_url or event_type is None:
            return
        if not self.throttle.should_send(job_id, event_type=event_type):
            return
        payload = {k.rstrip("_"): v for k, v in data.items()}
        event = WebhookEvent(type=event_type, job_id=job_id, tenant_id=row.tenant_id, data=payload)
        delivery = WebhookDeliveryRow(
            id=event.id,
            job_id=job_id,
            tenant_id=row.tenant_id,
            url=row.webhook_url,
            event_type=event_type,
            payload={"data": event.data, "created_at": event.created_at.isoformat()},
            status="pending",
            attempts=0,
            created_at=utcnow(),
        )
        self._spawn(self._store_and_send(delivery, event, row.params.get("trace_context")))

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _store_and_send(self, delivery: WebhookDeliveryRow, event: WebhookEvent, trace: dict | None) -> None:
        await asyncio.to_thread(self.store.add_delivery, delivery)
        with span("webhook_delivery", parent=trace, event_type=event.type, event_id=event.id):
            await self._send(delivery.url, delivery.tenant_id, event)

    async def _send(self, url: str, tenant_id: str, event: WebhookEvent) -> None:
        try:
            secret = self.secret_for(tenant_id)
        except (OSError, ValueError) as exc:
            await asyncio.to_thread(self.store.update_delivery, event.id, status="failed", last_error=str(exc))
            return
        result = await self.sender.deliver(url, secret, event)
        metrics().webhooks.inc(event=event.type, outcome="delivered" if result.delivered else "failed")
        if result.attempts > 1:
            metrics().webhooks.inc(result.attempts - 1, event=event.type, outcome="retried")
        if not result.delivered:
            log.warning("webhook %s for %s not delivered: %s", event.id, event.job_id, result.error)

    async def start(self) -> None:
        await self.resend_pending()

    async def stop(self) -> None:
        await self.drain()
        await self.sender.aclose()

    async def resend_pending(self) -> int:
        """After a restart: send again every event not yet delivered or given up on (at-least-once)."""
        pending = await asyncio.to_thread(self.store.due_deliveries, None, 1000)
        for row in pending:
            event = WebhookEvent(
                type=row.event_type,
                job_id=row.job_id,
                tenant_id=row.tenant_id,
                data={k: v for k, v in row.payload.get("data", {}).items() if k not in ("job_id", "tenant_id")},
                id=row.id,
                created_at=datetime.fromisoformat(row.payload["created_at"]).astimezone(UTC),
            )
            self._spawn(self._send(row.url, row.tenant_id, event))
        return len(pending)

    async def drain(self, timeout_s: float = 10.0) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout_s)


class BatchTracker:
    """Marks a bulk batch complete when its last job ends, and writes its result manifest (CSV) to S3."""

    def __init__(self, store: JobStore, results: ResultStore) -> None:
        self.store = store
        self.results = results
        self._tasks: set[asyncio.Task] = set()

    async def stop(self) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=30)

    def __call__(self, job_id: str, type_: str, data: dict[str, Any], row: JobRow) -> None:
        if row.batch_id and type_ in TERMINAL:
            task = asyncio.get_running_loop().create_task(asyncio.to_thread(self.check, row.batch_id, row.tenant_id))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def check(self, batch_id: str, tenant_id: str) -> str | None:
        counts = self.store.batch_counts(batch_id)
        if counts.get("queued") or counts.get("running"):
            return None
        batch = self.store.get_batch(batch_id, tenant_id)
        if batch.status == "completed":
            return batch.manifest_key
        key = f"tenants/{tenant_id}/batches/{batch_id}/manifest.csv"
        self.results.put_bytes(key, self.manifest(batch_id, batch.rejected), "text/csv", {"batch-id": batch_id})
        self.store.finish_batch(batch_id, key)
        return key

    def manifest(self, batch_id: str, rejected: list[dict[str, Any]]) -> bytes:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(
            ["line", "job_id", "status", "image_index", "seed", "s3_key", "sha256", "error_code", "error_message"]
        )
        rows = []
        for job in self.store.batch_jobs(batch_id):
            for image in job.images:
                rows.append(
                    [
                        job.batch_row,
                        job.id,
                        job.status,
                        image.index,
                        image.seed,
                        image.s3_key or "",
                        image.sha256 or "",
                        job.error_code or image.error_code or "",
                        job.error_message or "",
                    ]
                )
        for bad in rejected:
            rows.append([bad["line"], "", "rejected", "", "", "", "", bad["code"], bad["message"]])
        writer.writerows(sorted(rows, key=lambda r: (int(r[0]), str(r[3]))))
        return out.getvalue().encode()
