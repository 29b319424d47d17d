"""``GET /v1/usage``: the caller's billed usage (from the ledger), by day or by variant."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query

from zimage_platform.api.deps import Services, Tenant
from zimage_platform.api.usage.protocol import Usage
from zimage_platform.billing.usage import ledger_rows, totals
from zimage_platform.errors import InvalidRequest

router = APIRouter(prefix="/v1", tags=["usage"])


@router.get("/usage", response_model=Usage, response_model_exclude_none=True)
async def usage(
    services: Services,
    tenant: Tenant,
    start: Annotated[
        date | None, Query(alias="from", description="First day (UTC), default: this month's first.")
    ] = None,
    end: Annotated[date | None, Query(alias="to", description="Last day, inclusive (UTC), default: today.")] = None,
    group_by: Annotated[Literal["day", "variant"], Query()] = "day",
) -> dict:
    today = datetime.now(UTC).date()
    start = start or today.replace(day=1)
    end = end or today
    if end < start:
        raise InvalidRequest("'to' is before 'from'", code="invalid_date_range", param="to")
    if (end - start).days > 366:
        raise InvalidRequest("ask for at most a year at a time", code="invalid_date_range", param="from")
    rows = await asyncio.to_thread(ledger_rows, services.store.engine, tenant.id, start, end)
    lines, total = totals(rows, group_by)
    return {
        "tenant": tenant.id,
        "start": start,
        "end": end,
        "group_by": group_by,
        "data": [line.to_dict() for line in lines],
        "total": total.to_dict(),
    }
