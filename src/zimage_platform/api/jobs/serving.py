"""Serving logic of the native jobs API."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from zimage_platform.api.generation import (
    fetch_image_url,
    job_view,
    params_from,
    prepare_job,
    request_hash,
    store_input_image,
    submit,
)
from zimage_platform.api.jobs.protocol import JobRequest
from zimage_platform.api.services import PlatformServices
from zimage_platform.errors import InvalidRequest
from zimage_platform.pipeline.params import GenerationParams
from zimage_platform.telemetry.context import RequestTrace
from zimage_platform.tenancy import TenantSpec


def params_of(request: JobRequest, image=None) -> GenerationParams:
    return params_from(
        request,
        image=image,
        strength=request.strength,
        hires_from=request.hires.from_size if request.hires else None,
        hires_denoise=request.hires.denoise if request.hires else None,
    )


async def create_job(
    services: PlatformServices,
    tenant: TenantSpec,
    request: JobRequest,
    *,
    upload: bytes | None,
    idempotency_key: str | None,
    trace: RequestTrace,
) -> tuple[dict[str, Any], bool]:
    if upload is not None and request.image_url:
        raise InvalidRequest(
            "give the input image as an upload or as image_url, not both", code="image_twice", param="image"
        )
    data = (
        upload
        if upload is not None
        else await fetch_image_url(services, tenant, request.image_url)
        if request.image_url
        else None
    )
    body_hash = request_hash(request.model_dump(mode="json"), data)
    image, input_key = (
        await asyncio.to_thread(store_input_image, services, tenant, data) if data is not None else (None, None)
    )
    job = await asyncio.to_thread(  # the content policy may write an audit row
        prepare_job,
        services,
        tenant,
        request.variant,
        params_of(request, image),
        source="api",
        trace=trace,
        input_key=input_key,
        idempotency_key=idempotency_key,
        body_hash=body_hash,
        webhook_url=request.webhook_url,
    )
    row, created = await submit(services, tenant, job)
    return job_view(services, row), created


def get_job(services: PlatformServices, tenant: TenantSpec, job_id: str) -> dict[str, Any]:
    """Reads the job store: call it from a worker thread (or a sync route), never on the loop."""
    return job_view(services, services.store.get(job_id, tenant.id))


def list_jobs(services: PlatformServices, tenant: TenantSpec, status: str | None, limit: int) -> list[dict[str, Any]]:
    return [
        job_view(services, row, presign=False) for row in services.store.list(tenant.id, status=status, limit=limit)
    ]


async def cancel_job(services: PlatformServices, tenant: TenantSpec, job_id: str) -> dict[str, Any]:
    await services.scheduler.cancel(job_id, tenant.id)
    return await asyncio.to_thread(get_job, services, tenant, job_id)


async def job_events(services: PlatformServices, tenant: TenantSpec, job_id: str, after: int) -> AsyncIterator[dict]:
    """Server-sent events: queued (with position), started, progress i/N, then the terminal event.
    The caller checks the job belongs to ``tenant`` before the stream (and its 200) starts."""
    async for event in services.scheduler.events(job_id, after):
        event_type = event.pop("type")
        seq = event.pop("seq")
        event.pop("job_id", None)
        if "pass_" in event:
            event["pass"] = event.pop("pass_")
        if event_type in ("succeeded", "failed", "cancelled"):
            event["job"] = await asyncio.to_thread(get_job, services, tenant, job_id)
        yield {"event": event_type, "id": str(seq), "data": json.dumps({"job_id": job_id, **event}, default=str)}
