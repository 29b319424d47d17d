"""HTTP routes of the native jobs API: submit, read, list, stream events, cancel."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from sse_starlette.sse import EventSourceResponse

from zimage_platform.api.body import StrictJSONRoute, json_or_multipart
from zimage_platform.api.deps import Generating, Services, Tenant, Trace
from zimage_platform.api.jobs import serving
from zimage_platform.api.jobs.protocol import Job, JobList, JobRequest
from zimage_platform.api.streams import event_stream

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], route_class=StrictJSONRoute)

_REQUEST_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/JobRequest"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "request": {"type": "string", "description": "JobRequest as JSON"},
                        "image": {"type": "string", "format": "binary", "description": "Input image (PNG, JPEG, WebP)"},
                    },
                    "required": ["request"],
                }
            },
        },
    }
}


@router.post(
    "",
    status_code=202,
    response_model=Job,
    openapi_extra=_REQUEST_BODY,
    responses={200: {"description": "An earlier job with the same Idempotency-Key and body"}},
)
async def create_job(
    request: Request,
    response: Response,
    services: Services,
    tenant: Generating,
    trace: Trace,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> dict:
    """Submit a job (202). Same Idempotency-Key + same body → the same job (200); another body → 409."""
    body, upload = await json_or_multipart(
        request, JobRequest, file_field="image", max_file_bytes=services.config.limits.max_input_image_bytes
    )
    job, created = await serving.create_job(
        services, tenant, body, upload=upload, idempotency_key=idempotency_key, trace=trace
    )
    response.status_code = 202 if created else 200
    response.headers["Location"] = f"/v1/jobs/{job['id']}"
    return job


@router.get("", response_model=JobList)
async def list_jobs(
    services: Services,
    tenant: Tenant,
    status: Annotated[str | None, Query(pattern="^(queued|running|succeeded|failed|cancelled)$")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> dict:
    return {"object": "list", "data": await asyncio.to_thread(serving.list_jobs, services, tenant, status, limit)}


@router.get("/{job_id}", response_model=Job)
async def get_job(job_id: str, services: Services, tenant: Tenant) -> dict:
    """Status, per-image presigned URLs, seeds, per-stage timings, trace id, errors with reasons
    (read and presigned in a worker thread: the store never stalls the event loop)."""
    return await asyncio.to_thread(serving.get_job, services, tenant, job_id)


@router.get("/{job_id}/events", response_class=EventSourceResponse)
async def job_events(
    job_id: str,
    request: Request,
    services: Services,
    tenant: Tenant,
    last_event_id: Annotated[int, Header(alias="Last-Event-ID")] = 0,
) -> EventSourceResponse:
    """Server-sent events: ``queued`` (position), ``started``, ``progress`` (step/total), terminal;
    ``closed`` (with the error) if the key is revoked or the tenant suspended meanwhile."""
    await asyncio.to_thread(services.store.get, job_id, tenant.id)  # another tenant's job: 404 before the stream
    return event_stream(request, tenant, serving.job_events(services, tenant, job_id, last_event_id))


@router.post("/{job_id}/cancel", response_model=Job)
async def cancel_job(job_id: str, services: Services, tenant: Tenant) -> dict:
    """Queued → cancelled at once; running → cancelled at the next step boundary. Nothing is billed."""
    return await serving.cancel_job(services, tenant, job_id)
