"""Usage totals from the ledger: by day, by variant, or both (reports, the usage API, statements)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Literal

from sqlalchemy import Engine, select

from zimage_platform.billing.ledger import LedgerEntryRow
from zimage_platform.db import session_factory

GroupBy = Literal["day", "variant", "day_variant"]


@dataclass
class UsageLine:
    day: str | None
    variant: str | None
    images: int = 0
    gpu_seconds: float = 0.0
    amount: Decimal = Decimal("0")
    currency: str = ""

    def to_dict(self) -> dict:
        out = {
            "images": self.images,
            "gpu_seconds": round(self.gpu_seconds, 3),
            "amount": str(self.amount),
            "currency": self.currency,
        }
        if self.day is not None:
            out["day"] = self.day
        if self.variant is not None:
            out["variant"] = self.variant
        return out


def day_range(start: date, end: date) -> tuple[datetime, datetime]:
    """``[start 00:00, end+1 00:00)`` in UTC: ``--to`` is inclusive, as finance reads it."""
    return datetime.combine(start, time(), UTC), datetime.combine(end + timedelta(days=1), time(), UTC)


def entries_of(engine: Engine, *, job_id: str | None = None, trace_id: str | None = None) -> list[LedgerEntryRow]:
    """The rows billed for one job or one trace: from a request (or an invoice line) to its bill."""
    if not (job_id or trace_id):
        raise ValueError("name a job id or a trace id")
    q = select(LedgerEntryRow)
    if job_id:
        q = q.where(LedgerEntryRow.job_id == job_id)
    if trace_id:
        q = q.where(LedgerEntryRow.trace_id == trace_id)
    with session_factory(engine)() as s:
        return list(s.scalars(q.order_by(LedgerEntryRow.job_id, LedgerEntryRow.image_index)))


def ledger_rows(engine: Engine, tenant_id: str | None, start: date, end: date) -> list[LedgerEntryRow]:
    lo, hi = day_range(start, end)
    with session_factory(engine)() as s:
        q = select(LedgerEntryRow).where(LedgerEntryRow.delivered_at >= lo, LedgerEntryRow.delivered_at < hi)
        if tenant_id:
            q = q.where(LedgerEntryRow.tenant_id == tenant_id)
        return list(s.scalars(q.order_by(LedgerEntryRow.tenant_id, LedgerEntryRow.chain_seq)))


def totals(rows: list[LedgerEntryRow], group_by: GroupBy) -> tuple[list[UsageLine], UsageLine]:
    lines: dict[tuple, UsageLine] = defaultdict(lambda: UsageLine(None, None))
    total = UsageLine(None, None)
    for row in rows:
        day = row.delivered_at.date().isoformat() if group_by in ("day", "day_variant") else None
        variant = row.variant if group_by in ("variant", "day_variant") else None
        line = lines[(day, variant)]
        line.day, line.variant = day, variant
        for acc in (line, total):
            acc.images += 1
            acc.gpu_seconds += row.gpu_seconds
            acc.amount += Decimal(row.unit_price)
            acc.currency = row.currency
    return [lines[k] for k in sorted(lines, key=lambda k: (k[0] or "", k[1] or ""))], total
