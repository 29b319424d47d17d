"""Job-event listeners: webhooks through a durable outbox (delivered by
:mod:`~zimage_platform.scheduling.deliveries`), and bulk-batch completion.

Listeners are called synchronously by the scheduler for every job event; anything slow
(database writes, HTTP) is handed to a task so scheduling never waits on a receiver.
"""

from __future__ import annotations

import asyncio
import csv
import io
import logging
from typing import Any

from zimage_platform.scheduling.deliveries import DeliveryOutbox, WebhookDispatcher
from zimage_platform.scheduling.models import TERMINAL, JobRow, WebhookDeliveryRow
from zimage_platform.scheduling.store import JobStore
from zimage_platform.scheduling.webhooks import ProgressThrottle, WebhookEvent
from zimage_platform.storage.results import ResultStore

log = logging.getLogger(__name__)

#: Scheduler event → webhook event type (``queued`` is not sent: the 202 already said so).
WEBHOOK_TYPES = {t: f"job.{t}" for t in ("started", "progress", "succeeded", "failed", "cancelled")}


class WebhookNotifier:
    """Job events → outbox rows (written before any attempt) → the dispatcher."""

    def __init__(
        self,
        outbox: DeliveryOutbox,
        dispatcher: WebhookDispatcher,
        *,
        throttle: ProgressThrottle | None = None,
    ) -> None:
        self.outbox = outbox
        self.dispatcher = dispatcher
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
        delivery = self.outbox.row_for(event, row.webhook_url, trace=row.params.get("trace_context"))
        task = asyncio.get_running_loop().create_task(self._store_and_offer(delivery))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _store_and_offer(self, delivery: WebhookDeliveryRow) -> None:
        await asyncio.to_thread(self.outbox.add, delivery)
        self.dispatcher.offer(delivery)

    async def start(self) -> None:
        await self.dispatcher.start()

    async def stop(self) -> None:
        await self.drain()
        await self.dispatcher.stop()

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Wait for events being written and attempts in flight (not for retries scheduled later)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout_s)
        await self.dispatcher.drain(timeout_s)


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
