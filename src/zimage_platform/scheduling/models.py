"""Durable job state: a row per job and per image, written before anything is queued."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from zimage_platform.db.base import Base, UInt64, UTCDateTime, utcnow

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
IMAGE_STATUSES = ("pending", "done", "failed", "cancelled")


class JobRow(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_jobs_tenant_idempotency"),
        Index("ix_jobs_status_lease", "status", "lease_expires_at"),
        Index("ix_jobs_tenant_created", "tenant_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="queued")
    #: What the job asks for: text2img, edit (img2img) or hires (two passes).
    kind: Mapped[str] = mapped_column(String(16))
    variant: Mapped[str] = mapped_column(String(32))
    priority_class: Mapped[str] = mapped_column(String(16), default="standard")
    #: The tenant's plan when the job was submitted (what its images are billed at).
    plan: Mapped[str] = mapped_column(String(32), default="standard")
    pool: Mapped[str | None] = mapped_column(String(32))
    #: Resolved generation parameters (the same for every image but the seed).
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    n: Mapped[int] = mapped_column(Integer)
    #: Where it came from: api, openai, batch, comfy, workflow.
    source: Mapped[str] = mapped_column(String(16), default="api")
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    webhook_url: Mapped[str | None] = mapped_column(Text)
    batch_id: Mapped[str | None] = mapped_column(ForeignKey("batches.id"), index=True)
    batch_row: Mapped[int | None] = mapped_column(Integer)
    trace_id: Mapped[str | None] = mapped_column(String(32))
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    deadline_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    images: Mapped[list[JobImageRow]] = relationship(
        back_populates="job", order_by="JobImageRow.index", cascade="all, delete-orphan", lazy="selectin"
    )


class JobImageRow(Base):
    """One image of a job: the unit that is batched, stored, and (later) billed."""

    __tablename__ = "job_images"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    index: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: 0 … 2**64 − 1, stored two's-complement in the signed BIGINT (:class:`UInt64`).
    seed: Mapped[int] = mapped_column(UInt64)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    s3_key: Mapped[str | None] = mapped_column(Text)
    sha256: Mapped[str | None] = mapped_column(String(64))
    size_bytes: Mapped[int | None] = mapped_column(Integer)
    #: Per-stage timings from the engine (text encode, each step, decode, PNG).
    timings: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    batch_size: Mapped[int | None] = mapped_column(Integer)
    #: Seconds the engine spent on this image's batch, divided by the batch size.
    engine_s: Mapped[float | None] = mapped_column()
    replica: Mapped[str | None] = mapped_column(String(64))
    error_code: Mapped[str | None] = mapped_column(String(64))
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    job: Mapped[JobRow] = relationship(back_populates="images")


class BatchRow(Base):
    """A bulk submission (CSV / JSONL): its rows become jobs with ``batch_id`` set."""

    __tablename__ = "batches"
    __table_args__ = (
        Index("ix_batches_tenant_created", "tenant_id", "created_at"),
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_batches_tenant_idempotency"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="running")
    template: Mapped[str | None] = mapped_column(Text)
    total_rows: Mapped[int] = mapped_column(Integer, default=0)
    #: Rows refused at submission: [{"line": n, "code": ..., "message": ...}].
    rejected: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    manifest_key: Mapped[str | None] = mapped_column(Text)
    webhook_url: Mapped[str | None] = mapped_column(Text)
    #: Same key + same request (template, defaults, file) → the same batch; another request → 409.
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


#: ``pending`` until a 2xx (``delivered``), or until it cannot be delivered (``dead_letter``:
#: a permanent refusal, or still failing at its ``give_up_at``); the tenant can redeliver it.
DELIVERY_STATUSES = ("pending", "delivered", "dead_letter")


class WebhookDeliveryRow(Base):
    """The webhook outbox: an event is stored before it is sent, so none is lost on restart."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_status_next", "status", "next_attempt_at"),
        Index("ix_webhook_deliveries_tenant_status", "tenant_id", "status", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    url: Mapped[str] = mapped_column(Text)
    event_type: Mapped[str] = mapped_column(String(32))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    #: The last attempt's reason code (``http_status``, ``timeout``, ``not_public`` ...), never its text.
    last_error: Mapped[str | None] = mapped_column(Text)
    #: When the next attempt is due (pending) or, while one is in flight, when its claim lapses.
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: No retry after this (``webhooks.max_age_s`` after it was queued or redelivered).
    give_up_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
