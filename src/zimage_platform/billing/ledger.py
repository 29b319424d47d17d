"""The usage ledger: one row per delivered image, hash-chained per tenant, never billed twice.

A row is written in the same database transaction that marks its image done (so an image is
either delivered *and* billed, or neither), is unique on (job, image index), and links to the
previous row of its tenant by hash: altering, deleting or reordering rows breaks the chain.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import TYPE_CHECKING, Any

from sqlalchemy import Float, Integer, Numeric, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, Session, mapped_column

from zimage_platform.db.base import Base, UTCDateTime
from zimage_platform.db.chain import append_many

if TYPE_CHECKING:
    from zimage_platform.config import BillingConfig

MONEY = Decimal("0.000001")


def chain_name(tenant_id: str) -> str:
    return f"ledger:{tenant_id}"


class LedgerEntryRow(Base):
    __tablename__ = "ledger_entries"
    __table_args__ = (
        UniqueConstraint("job_id", "image_index", name="uq_ledger_job_image"),
        UniqueConstraint("tenant_id", "chain_seq", name="uq_ledger_tenant_seq"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(String(64), index=True)
    chain_seq: Mapped[int] = mapped_column(Integer)
    job_id: Mapped[str] = mapped_column(String(40), index=True)
    image_index: Mapped[int] = mapped_column(Integer)
    plan: Mapped[str] = mapped_column(String(32))
    variant: Mapped[str] = mapped_column(String(32))
    bucket: Mapped[str] = mapped_column(String(16))
    steps: Mapped[int] = mapped_column(Integer)
    backend: Mapped[str] = mapped_column(String(16))
    pool: Mapped[str] = mapped_column(String(32))
    mig_profile: Mapped[str | None] = mapped_column(String(16))
    batch_size: Mapped[int] = mapped_column(Integer)
    gpu_seconds: Mapped[float] = mapped_column(Float)
    unit_price: Mapped[Decimal] = mapped_column(Numeric(18, 6))
    currency: Mapped[str] = mapped_column(String(3))
    s3_key: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(Integer)
    #: The object's ETag when it was billed: any later overwrite of the key changes it.
    etag: Mapped[str | None] = mapped_column(String(128))
    trace_id: Mapped[str | None] = mapped_column(String(32))
    job_created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    delivered_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))

    def content(self) -> dict[str, Any]:
        """Everything the hash covers (money as text, so the same value always hashes the same)."""
        return {
            "tenant_id": self.tenant_id,
            "chain_seq": self.chain_seq,
            "job_id": self.job_id,
            "image_index": self.image_index,
            "plan": self.plan,
            "variant": self.variant,
            "bucket": self.bucket,
            "steps": self.steps,
            "backend": self.backend,
            "pool": self.pool,
            "mig_profile": self.mig_profile,
            "batch_size": self.batch_size,
            "gpu_seconds": round(float(self.gpu_seconds), 6),
            "unit_price": str(Decimal(self.unit_price).quantize(MONEY)),
            "currency": self.currency,
            "s3_key": self.s3_key,
            "sha256": self.sha256,
            "size_bytes": self.size_bytes,
            "etag": self.etag,
            "trace_id": self.trace_id,
            "job_created_at": self.job_created_at.isoformat(),
            "delivered_at": self.delivered_at.isoformat(),
        }


@dataclass(frozen=True)
class LedgerEntry:
    """What the scheduler knows when an image is delivered; priced and chained on append."""

    tenant_id: str
    job_id: str
    image_index: int
    plan: str
    variant: str
    bucket: str
    steps: int
    backend: str
    pool: str
    mig_profile: str | None
    batch_size: int
    #: The batch's engine seconds × the slice's fraction of a GPU ÷ the batch size.
    gpu_seconds: float
    s3_key: str
    sha256: str
    size_bytes: int
    trace_id: str | None
    job_created_at: datetime
    delivered_at: datetime
    etag: str | None = None


def price(billing: BillingConfig, plan: str, variant: str, bucket: str) -> tuple[Decimal, str]:
    """Unit price of one image from the plan's table: per megapixel, at least the minimum."""
    table = billing.plans.get(plan) or billing.plans[billing.default_plan]
    rule = table.prices.get(variant) or table.prices.get("default")
    if rule is None:
        raise ValueError(f"plan {plan!r} has no price for variant {variant!r} and no default")
    width, height = (int(x) for x in bucket.split("x"))
    megapixels = Decimal(width * height) / Decimal(1_000_000)
    amount = max(rule.minimum, rule.per_megapixel * megapixels)
    return amount.quantize(MONEY, rounding=ROUND_HALF_UP), table.currency


def append_entry(session: Session, billing: BillingConfig, entry: LedgerEntry) -> LedgerEntryRow:
    """Price the image and chain its row, inside the caller's transaction."""
    return append_entries(session, billing, [entry])[0]


def append_entries(session: Session, billing: BillingConfig, entries: list[LedgerEntry]) -> list[LedgerEntryRow]:
    """Price and chain several images' rows (a batch's), each tenant's chain head locked once."""
    rows = [_priced(billing, entry) for entry in entries]
    by_tenant: dict[str, list[LedgerEntryRow]] = {}
    for row in rows:
        by_tenant.setdefault(row.tenant_id, []).append(row)
    for tenant_id, tenant_rows in by_tenant.items():

        def content_at(row: LedgerEntryRow) -> Callable[[int], dict[str, Any]]:
            def content(seq: int) -> dict[str, Any]:
                row.chain_seq = seq
                return row.content()

            return content

        links = append_many(session, chain_name(tenant_id), [content_at(row) for row in tenant_rows])
        for row, (_, prev, digest) in zip(tenant_rows, links, strict=True):
            row.prev_hash, row.hash = prev, digest
    session.add_all(rows)
    return rows


def _priced(billing: BillingConfig, entry: LedgerEntry) -> LedgerEntryRow:
    unit_price, currency = price(billing, entry.plan, entry.variant, entry.bucket)
    return LedgerEntryRow(
        tenant_id=entry.tenant_id,
        job_id=entry.job_id,
        image_index=entry.image_index,
        plan=entry.plan,
        variant=entry.variant,
        bucket=entry.bucket,
        steps=entry.steps,
        backend=entry.backend,
        pool=entry.pool,
        mig_profile=entry.mig_profile,
        batch_size=entry.batch_size,
        gpu_seconds=round(entry.gpu_seconds, 6),
        unit_price=unit_price,
        currency=currency,
        s3_key=entry.s3_key,
        sha256=entry.sha256,
        size_bytes=entry.size_bytes,
        etag=entry.etag,
        trace_id=entry.trace_id,
        job_created_at=entry.job_created_at,
        delivered_at=entry.delivered_at,
        chain_seq=0,
        prev_hash="",
        hash="",
    )
