"""The job store: every state change of a job is a committed row change, made here.

State machine (reason codes on every failure)::

    queued ──claim──▶ running ──finish──▶ succeeded | failed | cancelled
      │                  │ lease expired (replica lost): back to queued, done images kept
      └──cancel / deadline──▶ cancelled | failed

Images are the unit of work: a job's image that is ``done`` is never generated or stored
again; a re-run after a crash lands on the same S3 key (idempotent by job and index).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from zimage_platform.billing.ledger import LedgerEntry, append_entries
from zimage_platform.db import session_factory, utcnow
from zimage_platform.errors import PlatformError
from zimage_platform.scheduling.models import TERMINAL, BatchRow, JobImageRow, JobRow, WebhookDeliveryRow

if TYPE_CHECKING:
    from zimage_platform.config import BillingConfig


class IdempotencyConflict(PlatformError):
    code = "idempotency_conflict"
    status = 409


class BatchExists(PlatformError):
    """A bulk batch with this id or Idempotency-Key is already written (the earlier one stands)."""

    code = "batch_exists"
    status = 409


class JobNotFound(PlatformError):
    code = "job_not_found"
    status = 404


class JobFinished(PlatformError):
    code = "job_finished"
    status = 409


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


@dataclass
class NewJob:
    tenant_id: str
    variant: str
    kind: str
    params: dict[str, Any]
    seeds: list[int]
    priority_class: str = "standard"
    plan: str = "standard"
    source: str = "api"
    idempotency_key: str | None = None
    request_hash: str | None = None
    webhook_url: str | None = None
    batch_id: str | None = None
    batch_row: int | None = None
    trace_id: str | None = None
    deadline_at: datetime | None = None
    #: The tenant's admission limits, checked by the scheduler (the one place that sees every job).
    max_concurrent_jobs: int | None = None
    monthly_images: int | None = None
    id: str = field(default_factory=lambda: new_id("job"))

    def row(self, now: datetime) -> JobRow:
        return JobRow(
            id=self.id,
            tenant_id=self.tenant_id,
            status="queued",
            kind=self.kind,
            variant=self.variant,
            priority_class=self.priority_class,
            plan=self.plan,
            params=self.params,
            n=len(self.seeds),
            source=self.source,
            idempotency_key=self.idempotency_key,
            request_hash=self.request_hash,
            webhook_url=self.webhook_url,
            batch_id=self.batch_id,
            batch_row=self.batch_row,
            trace_id=self.trace_id,
            deadline_at=self.deadline_at,
            attempts=0,
            cancel_requested=False,
            created_at=now,
            images=[JobImageRow(index=i, seed=s, status="pending") for i, s in enumerate(self.seeds)],
        )


@dataclass(frozen=True)
class StoredImage:
    s3_key: str
    sha256: str
    size_bytes: int
    timings: list[dict[str, Any]]
    batch_size: int
    engine_s: float
    replica: str | None = None


@dataclass
class DoneImage:
    """A delivered image to record, with its bill."""

    job_id: str
    index: int
    image: StoredImage
    ledger: LedgerEntry | None = None


@dataclass(frozen=True)
class Finish:
    job_id: str
    status: str
    code: str | None = None
    message: str | None = None


@dataclass
class Claimed:
    #: Jobs that may run now, under the caller's lease.
    running: dict[str, JobRow] = field(default_factory=dict)
    #: Jobs whose cancellation was requested while they waited: finished as cancelled by the claim.
    cancelled: list[JobRow] = field(default_factory=list)
    #: Jobs another scheduler holds under a live lease (not ours to run).
    held: list[str] = field(default_factory=list)


@dataclass
class Recorded:
    #: (job, index) of the images this call marked done and billed (not those already done).
    recorded: set[tuple[str, int]] = field(default_factory=set)
    #: Rows of the jobs this call finished, as they are now.
    finished: dict[str, JobRow] = field(default_factory=dict)


class JobStore:
    def __init__(self, engine: Engine, billing: BillingConfig | None = None) -> None:
        from zimage_platform.config import BillingConfig

        self.engine = engine
        #: Prices for the ledger rows written with delivered images (default: the standard table).
        self.billing = billing or BillingConfig()
        self._sessions = session_factory(engine)

    def session(self) -> Session:
        return self._sessions()

    # -- creation -----------------------------------------------------------------------

    def create(self, job: NewJob) -> tuple[JobRow, bool]:
        """Write the job (durable before it is queued). Same idempotency key + same request →
        the existing job (``created`` False); same key + another request → 409."""
        if job.idempotency_key:
            existing = self._by_idempotency_key(job.tenant_id, job.idempotency_key)
            if existing is not None:
                return self._same_request(existing, job), False
        row = job.row(utcnow())
        try:
            with self.session() as s, s.begin():
                s.add(row)
        except IntegrityError:
            existing = self._by_idempotency_key(job.tenant_id, job.idempotency_key or "")
            if existing is None:
                raise
            return self._same_request(existing, job), False
        return row, True  # every column is set here (no server defaults): no read-back

    def create_many(self, jobs: Sequence[NewJob], batch: BatchRow | None = None) -> list[JobRow]:
        """A bulk batch's row and its jobs, in one transaction (thousands of rows): all or nothing.
        ``BatchExists`` when the batch (its id, or its tenant's Idempotency-Key) is already written."""
        now = utcnow()
        rows = [j.row(now) for j in jobs]
        try:
            with self.session() as s, s.begin():
                if batch is not None:
                    s.add(batch)
                    s.flush()  # the batch first: the jobs refer to it
                s.add_all(rows)
        except IntegrityError:
            if batch is not None and self._batch_written(batch):
                raise BatchExists(f"batch {batch.id} is already written", param="Idempotency-Key") from None
            raise
        return rows

    def find_idempotent(self, job: NewJob) -> JobRow | None:
        """The job an earlier submission with this Idempotency-Key created (409 if the body differs)."""
        existing = self._by_idempotency_key(job.tenant_id, job.idempotency_key or "")
        return self._same_request(existing, job) if existing is not None else None

    def _by_idempotency_key(self, tenant_id: str, key: str) -> JobRow | None:
        with self.session() as s:
            return s.scalar(select(JobRow).where(JobRow.tenant_id == tenant_id, JobRow.idempotency_key == key))

    @staticmethod
    def _same_request(existing: JobRow, job: NewJob) -> JobRow:
        if existing.request_hash != job.request_hash:
            raise IdempotencyConflict(
                "this Idempotency-Key was used with a different request body", param="Idempotency-Key"
            )
        return existing

    # -- reads --------------------------------------------------------------------------

    def get(self, job_id: str, tenant_id: str | None = None) -> JobRow:
        """The job, scoped to ``tenant_id`` when given: another tenant's job is simply absent."""
        with self.session() as s:
            row = s.get(JobRow, job_id)
        if row is None or (tenant_id is not None and row.tenant_id != tenant_id):
            raise JobNotFound(f"no job {job_id}", param="job_id")
        return row

    def list(self, tenant_id: str, *, status: str | None = None, limit: int = 50, before: datetime | None = None):
        with self.session() as s:
            q = select(JobRow).where(JobRow.tenant_id == tenant_id)
            if status:
                q = q.where(JobRow.status == status)
            if before:
                q = q.where(JobRow.created_at < before)
            return list(s.scalars(q.order_by(JobRow.created_at.desc()).limit(limit)))

    def images_since(self, tenant_id: str, since: datetime) -> int:
        """Images a tenant asked for since ``since`` that are delivered or still on their way."""
        with self.session() as s:
            q = (
                select(func.count())
                .select_from(JobImageRow)
                .join(JobRow, JobRow.id == JobImageRow.job_id)
                .where(
                    JobRow.tenant_id == tenant_id,
                    JobRow.created_at >= since,
                    JobImageRow.status.in_(("pending", "done")),
                )
            )
            return int(s.scalar(q) or 0)

    def queued(self) -> list[JobRow]:
        """Every job waiting for work, oldest first (the scheduler rebuilds its queues from this)."""
        with self.session() as s:
            return list(s.scalars(select(JobRow).where(JobRow.status == "queued").order_by(JobRow.created_at)))

    def cancel_requested(self, job_ids: Iterable[str]) -> set[str]:
        ids = list(job_ids)
        if not ids:
            return set()
        with self.session() as s:
            q = select(JobRow.id).where(JobRow.id.in_(ids), or_(JobRow.cancel_requested, JobRow.status == "cancelled"))
            return set(s.scalars(q))

    # -- running ------------------------------------------------------------------------

    def claim(self, job_id: str, owner: str, lease_s: float) -> JobRow | None:
        """One job's :meth:`claim_many`: its running row, or ``None`` (do not run it)."""
        return self.claim_many([job_id], owner, lease_s).running.get(job_id)

    def claim_many(self, job_ids: Sequence[str], owner: str, lease_s: float) -> Claimed:
        """queued → running under ``owner``'s lease, for a whole batch in one transaction.

        A row already running under *another* owner's live lease is not taken (during a redeploy
        the old scheduler keeps its jobs until it hands them back or its lease runs out). A job
        cancelled while it waited is finished as cancelled here, not run. Finished jobs are left out.
        """
        now = utcnow()
        claimed = Claimed()
        if not job_ids:
            return claimed
        with self.session() as s, s.begin():
            rows = s.scalars(select(JobRow).where(JobRow.id.in_(list(job_ids))).with_for_update()).all()
            for row in rows:
                if row.status in TERMINAL:
                    continue
                if row.cancel_requested:
                    self._finish_row(row, "cancelled", "cancelled_by_client", "cancelled before it started", now)
                    claimed.cancelled.append(row)
                    continue
                held = row.status == "running" and row.lease_owner not in (None, owner)
                if held and row.lease_expires_at is not None and row.lease_expires_at > now:
                    claimed.held.append(row.id)
                    continue
                if row.status == "queued" or held:
                    row.status = "running"
                    row.attempts += 1
                    row.started_at = row.started_at or now
                row.lease_owner = owner
                row.lease_expires_at = now + timedelta(seconds=lease_s)
                claimed.running[row.id] = row
        return claimed

    def renew(self, job_ids: Iterable[str], owner: str, lease_s: float) -> None:
        ids = list(job_ids)
        if not ids:
            return
        with self.session() as s, s.begin():
            s.execute(
                update(JobRow)
                .where(JobRow.id.in_(ids), JobRow.status == "running", JobRow.lease_owner == owner)
                .values(lease_expires_at=utcnow() + timedelta(seconds=lease_s))
            )

    def record_image(self, job_id: str, index: int, image: StoredImage, ledger: LedgerEntry | None = None) -> bool:
        """One image's :meth:`record_batch`: ``False`` if it was already recorded (and billed)."""
        return (job_id, index) in self.record_batch([DoneImage(job_id, index, image, ledger)]).recorded

    def record_batch(self, done: Sequence[DoneImage], finishes: Sequence[Finish] = ()) -> Recorded:
        """A batch's delivered images marked done and billed, and the jobs it completes finished,
        in one transaction (delivered ⇔ billed; one commit per engine batch, not per image).

        Idempotent per image: one already done is neither marked nor billed again.
        """
        now = utcnow()
        recorded = Recorded()
        with self.session() as s, s.begin():
            wanted = {(item.job_id, item.index) for item in done}
            images: dict[tuple[str, int], JobImageRow] = {}
            if wanted:
                job_ids = sorted({job_id for job_id, _ in wanted})
                q = select(JobImageRow).where(JobImageRow.job_id.in_(job_ids)).with_for_update()
                images = {(r.job_id, r.index): r for r in s.scalars(q) if (r.job_id, r.index) in wanted}
            bills: list[LedgerEntry] = []
            for item in done:
                row = images.get((item.job_id, item.index))
                if row is None:
                    raise JobNotFound(f"no image {item.index} of job {item.job_id}")
                if row.status == "done" or (item.job_id, item.index) in recorded.recorded:
                    continue
                image = item.image
                row.status = "done"
                row.s3_key, row.sha256, row.size_bytes = image.s3_key, image.sha256, image.size_bytes
                row.timings, row.batch_size, row.engine_s = image.timings, image.batch_size, image.engine_s
                row.replica, row.finished_at = image.replica, now
                if item.ledger is not None:
                    bills.append(item.ledger)
                recorded.recorded.add((item.job_id, item.index))
            if bills:
                append_entries(s, self.billing, bills)
            s.flush()
            if finishes:
                ids = [f.job_id for f in finishes]
                jobs = {j.id: j for j in s.scalars(select(JobRow).where(JobRow.id.in_(ids)).with_for_update())}
                for finish in finishes:
                    job = jobs.get(finish.job_id)
                    if job is None:
                        raise JobNotFound(f"no job {finish.job_id}")
                    self._finish_row(job, finish.status, finish.code, finish.message, now)
                    recorded.finished[job.id] = job
        return recorded

    def pending_indexes(self, job_id: str) -> list[int]:
        with self.session() as s:
            q = select(JobImageRow.index).where(JobImageRow.job_id == job_id, JobImageRow.status == "pending")
            return list(s.scalars(q.order_by(JobImageRow.index)))

    def finish(self, job_id: str, status: str, *, code: str | None = None, message: str | None = None) -> JobRow:
        """Move a job to a terminal state (once: a finished job stays as it finished)."""
        return self.record_batch([], [Finish(job_id, status, code, message)]).finished[job_id]

    @staticmethod
    def _finish_row(row: JobRow, status: str, code: str | None, message: str | None, now: datetime) -> None:
        assert status in TERMINAL
        if row.status in TERMINAL:
            return
        row.status, row.error_code, row.error_message = status, code, message
        row.finished_at, row.lease_owner, row.lease_expires_at = now, None, None
        leftover = "cancelled" if status == "cancelled" else "failed"
        for image in row.images:
            if image.status == "pending":
                image.status, image.error_code, image.finished_at = leftover, code, now

    def request_cancel(self, job_id: str, tenant_id: str) -> JobRow:
        """Queued → cancelled now; running → flagged, stopped at the next step boundary."""
        row = self.get(job_id, tenant_id)
        if row.status in TERMINAL:
            raise JobFinished(f"job {job_id} already {row.status}", param="job_id")
        if row.status == "queued":
            with self.session() as s, s.begin():
                s.execute(update(JobRow).where(JobRow.id == job_id).values(cancel_requested=True))
            return self.finish(job_id, "cancelled", code="cancelled_by_client", message="cancelled before it started")
        with self.session() as s, s.begin():
            s.execute(update(JobRow).where(JobRow.id == job_id).values(cancel_requested=True))
        return self.get(job_id)

    # -- recovery -----------------------------------------------------------------------

    def requeue_expired(self, now: datetime | None = None) -> list[JobRow]:
        """Running jobs whose lease ran out (their scheduler died or gave them up): back to queued,
        done images kept. One whose cancellation was requested meanwhile is finished as cancelled
        instead (it would otherwise wait forever: a claim never runs it). Returns both kinds."""
        now = now or utcnow()
        with self.session() as s, s.begin():
            rows = s.scalars(
                select(JobRow).where(JobRow.status == "running", JobRow.lease_expires_at < now).with_for_update()
            ).all()
            for row in rows:
                if row.cancel_requested:
                    self._finish_row(row, "cancelled", "cancelled_by_client", "cancelled by the client", now)
                else:
                    row.status, row.lease_owner, row.lease_expires_at = "queued", None, None
        return list(rows)

    def release(self, job_ids: Sequence[str], owner: str) -> None:
        """Hand our running jobs back to the queue at once (shutdown, or a scheduler that cannot
        record them): the next scheduler's sweep or start-up picks them up without waiting out the lease."""
        if not job_ids:
            return
        with self.session() as s, s.begin():
            s.execute(
                update(JobRow)
                .where(JobRow.id.in_(list(job_ids)), JobRow.status == "running", JobRow.lease_owner == owner)
                .values(status="queued", lease_owner=None, lease_expires_at=None)
            )

    def expire_deadlines(self, now: datetime | None = None) -> list[JobRow]:
        """Queued jobs past their queue deadline fail with ``queue_timeout`` (reported, not dropped)."""
        now = now or utcnow()
        with self.session() as s:
            q = select(JobRow.id).where(
                JobRow.status == "queued", JobRow.deadline_at.is_not(None), JobRow.deadline_at < now
            )
            ids = list(s.scalars(q))
        return [
            self.finish(i, "failed", code="queue_timeout", message="waited past its priority class's queue deadline")
            for i in ids
        ]

    # -- bulk batches -------------------------------------------------------------------

    def _batch_written(self, batch: BatchRow) -> bool:
        with self.session() as s:
            if s.get(BatchRow, batch.id) is not None:
                return True
        return batch.idempotency_key is not None and self.find_batch(batch.tenant_id, batch.idempotency_key) is not None

    def find_batch(self, tenant_id: str, idempotency_key: str) -> BatchRow | None:
        """The batch an earlier submission with this Idempotency-Key wrote."""
        with self.session() as s:
            q = select(BatchRow).where(BatchRow.tenant_id == tenant_id, BatchRow.idempotency_key == idempotency_key)
            return s.scalar(q)

    def get_batch(self, batch_id: str, tenant_id: str) -> BatchRow:
        with self.session() as s:
            row = s.get(BatchRow, batch_id)
        if row is None or row.tenant_id != tenant_id:
            raise JobNotFound(f"no batch {batch_id}", code="batch_not_found", param="batch_id")
        return row

    def batch_counts(self, batch_id: str) -> dict[str, int]:
        with self.session() as s:
            rows = s.execute(
                select(JobRow.status, func.count()).where(JobRow.batch_id == batch_id).group_by(JobRow.status)
            )
            return {status: count for status, count in rows}

    def batch_jobs(self, batch_id: str) -> list[JobRow]:
        with self.session() as s:
            return list(s.scalars(select(JobRow).where(JobRow.batch_id == batch_id).order_by(JobRow.batch_row)))

    def finish_batch(self, batch_id: str, manifest_key: str | None) -> BatchRow:
        with self.session() as s, s.begin():
            row = s.get(BatchRow, batch_id)
            assert row is not None
            row.status, row.manifest_key, row.finished_at = "completed", manifest_key, utcnow()
        return row

    # -- webhook outbox (its state machine: scheduling/deliveries.py) ---------------------

    def add_delivery(self, delivery: WebhookDeliveryRow) -> None:
        with self.session() as s, s.begin():
            s.add(delivery)

    def deliveries(self, job_id: str) -> list[WebhookDeliveryRow]:
        with self.session() as s:
            q = select(WebhookDeliveryRow).where(WebhookDeliveryRow.job_id == job_id)
            return list(s.scalars(q.order_by(WebhookDeliveryRow.created_at)))
