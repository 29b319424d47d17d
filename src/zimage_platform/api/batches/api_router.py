"""HTTP routes of bulk batches: upload a CSV/JSONL with a template; follow counts and rows."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, File, Form, Header, Query, Response, UploadFile

from zimage_platform.api.batches import serving
from zimage_platform.api.batches.protocol import Batch, BatchRequest
from zimage_platform.api.body import StrictJSONRoute, loads, parse_model
from zimage_platform.api.deps import Generating, Services, Tenant, Trace
from zimage_platform.errors import InvalidRequest

router = APIRouter(prefix="/v1/batches", tags=["batches"], route_class=StrictJSONRoute)


@router.post(
    "",
    status_code=202,
    response_model=Batch,
    responses={200: {"description": "An earlier batch with the same Idempotency-Key, request and file"}},
)
async def create_batch(
    response: Response,
    services: Services,
    tenant: Generating,
    trace: Trace,
    file: Annotated[UploadFile, File(description="CSV (header row) or JSONL (.jsonl), one image request per row.")],
    request: Annotated[str, Form(description="BatchRequest as JSON: template, defaults, webhook_url.")] = "{}",
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> dict:
    """Submit a file (202). Same Idempotency-Key + same request and file → the same batch (200);
    another request → 409. A template with a placeholder that is not a plain column → 400."""
    try:
        parsed = parse_model(BatchRequest, loads(request))
    except ValueError:
        raise InvalidRequest("request is not valid JSON", code="invalid_json", param="request") from None
    limit = services.config.limits.max_body_bytes
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise InvalidRequest(f"the file is larger than {limit} bytes", code="batch_too_large", param="file")
    batch, created = await serving.create_batch(
        services, tenant, parsed, data, file.filename or "rows.csv", trace, idempotency_key=idempotency_key
    )
    response.status_code = 202 if created else 200
    return batch


@router.get("/{batch_id}", response_model=Batch)
async def get_batch(
    batch_id: str,
    services: Services,
    tenant: Tenant,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> dict:
    """Counts by status, rejected rows with line numbers, per-row status, and the result manifest."""
    return await asyncio.to_thread(serving.get_batch, services, tenant, batch_id, offset, limit)
