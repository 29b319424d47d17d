"""Serving logic every generation endpoint shares: caller parameters → a durable job, job → view.

The native jobs API, the OpenAI images API, bulk batches and (later) the ComfyUI compiler all
turn their wire formats into :class:`GenerationParams` and call :func:`prepare_job`, so a size,
sampler or image is validated the same way wherever it comes from.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx

from zimage_platform.api.services import PlatformServices
from zimage_platform.errors import InvalidRequest, PlatformError
from zimage_platform.netsafe import IMAGE_URLS, UrlError, failure_reason
from zimage_platform.pipeline.images import ImageLimits, decode_image
from zimage_platform.pipeline.params import GenerationParams, resolve_requests
from zimage_platform.scheduling.client import SchedulerUnavailable
from zimage_platform.scheduling.models import TERMINAL, BatchRow, JobRow
from zimage_platform.scheduling.service import Submitted
from zimage_platform.scheduling.store import JobNotFound, NewJob, new_id
from zimage_platform.telemetry.context import RequestTrace
from zimage_platform.tenancy import TenantSpec
from zimage_platform.tenancy.policy import PolicyViolation


def request_hash(body: Any, image: bytes | None = None) -> str:
    """What makes two submissions "the same request" for Idempotency-Key purposes."""
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode())
    if image is not None:
        digest.update(hashlib.sha256(image).digest())
    return digest.hexdigest()


def image_limits(services: PlatformServices) -> ImageLimits:
    limits = services.config.limits
    return ImageLimits(max_bytes=limits.max_input_image_bytes, max_pixels=limits.max_input_image_pixels)


async def fetch_image_url(services: PlatformServices, tenant: TenantSpec, url: str) -> bytes:
    """Bytes of an input image named by URL: the tenant's own S3 objects, or a public http(s) URL."""
    limits = services.config.limits
    if url.startswith("s3://"):
        bucket, _, key = url.removeprefix("s3://").partition("/")
        prefix = f"tenants/{tenant.id}/"
        # Isolation: another tenant's object (or another bucket) is simply not found.
        if bucket != services.results.bucket or not key.startswith(prefix):
            raise InvalidRequest(f"no object {url}", code="image_url_not_found", param="image_url")
        return await asyncio.to_thread(services.results.get_bytes, key)
    IMAGE_URLS.parse(url)  # scheme, host, credentials; the address is checked as it connects
    try:
        # services.http is IMAGE_URLS.client(): it connects only to an address it has checked.
        async with services.http.stream("GET", url, timeout=15.0) as response:
            if response.status_code != 200:
                raise UrlError(
                    f"fetching the image URL answered HTTP {response.status_code}",
                    code="image_url_unreachable",
                    param="image_url",
                    reason="http_status",
                )
            declared = int(response.headers.get("content-length") or 0)
            if declared > limits.max_input_image_bytes:
                raise InvalidRequest("the image is larger than the limit", code="image_too_large", param="image_url")
            data = bytearray()
            async for chunk in response.aiter_bytes():
                data += chunk
                if len(data) > limits.max_input_image_bytes:
                    raise InvalidRequest(
                        "the image is larger than the limit", code="image_too_large", param="image_url"
                    )
            return bytes(data)
    except httpx.HTTPError as exc:
        # The reason code only: the target's exception text is no business of the caller's.
        reason = failure_reason(exc)
        raise UrlError(
            f"could not fetch the image URL ({reason})", code="image_url_unreachable", param="image_url", reason=reason
        ) from exc


def store_input_image(services: PlatformServices, tenant: TenantSpec, data: bytes, *, param: str = "image"):
    """Validate (format, bytes, declared pixels) and keep the input where every replica can read it."""
    image = decode_image(data, image_limits(services), param=param)
    key = f"tenants/{tenant.id}/inputs/{datetime.now(UTC):%Y/%m/%d}/{uuid.uuid4().hex}"
    services.results.put_bytes(key, data, "application/octet-stream", {"tenant-id": tenant.id})
    return image, key


#: Generation fields the wire schemas (images, jobs) share, by name, with ``GenerationParams``.
SHARED_PARAMS = ("prompt", "size", "n", "seed", "steps", "guidance", "negative_prompt", "sampler", "scheduler", "shift")
#: Job params that are the platform's plumbing, not the caller's request (never shown).
_INTERNAL_PARAMS = ("trace_context", "input_key", "png_text")


def params_from(request: Any, **rest: Any) -> GenerationParams:
    """A wire request's generation parameters; ``rest`` gives what its schema says differently."""
    return GenerationParams(**{**{name: getattr(request, name) for name in SHARED_PARAMS}, **rest})


def prepare_job(
    services: PlatformServices,
    tenant: TenantSpec,
    variant: str,
    params: GenerationParams,
    *,
    source: str,
    trace: RequestTrace,
    input_key: str | None = None,
    idempotency_key: str | None = None,
    body_hash: str | None = None,
    webhook_url: str | None = None,
    webhook_checked: bool = False,
    batch_id: str | None = None,
    batch_row: int | None = None,
) -> NewJob:
    """Validate everything now (nothing invalid is ever queued) and describe the job to write.
    ``webhook_checked``: the caller validated ``webhook_url`` already (a bulk batch, once for all rows)."""
    config = services.config
    spec = config.variant(variant)
    if tenant.limits.allowed_variants and variant not in tenant.limits.allowed_variants:
        raise InvalidRequest(
            f"variant {variant!r} is not enabled for this tenant",
            code="variant_not_allowed",
            param="variant",
            choices=tenant.limits.allowed_variants,
        )
    requests = resolve_requests(
        params, spec, config.buckets_for(variant), max_prompt_chars=config.limits.max_prompt_chars
    )
    if len(requests) > config.limits.max_images_per_request:
        raise InvalidRequest(
            f"n must be at most {config.limits.max_images_per_request}", code="n_out_of_range", param="n"
        )
    first = requests[0]
    if tenant.limits.max_pixels is not None and first.size.pixels > tenant.limits.max_pixels:
        allowed = [str(b) for b in config.buckets_for(variant) if b.pixels <= tenant.limits.max_pixels]
        raise InvalidRequest(
            f"{first.size} is above this tenant's resolution limit",
            code="size_not_allowed",
            param="size",
            choices=allowed,
        )
    policy = services.policies.for_tenant(tenant.id, tenant.policy)
    for param, text in (("prompt", first.prompt), ("negative_prompt", first.negative_prompt)):
        hit = policy.match(text)
        if hit is not None:
            # Recorded for review (rule id, never the prompt itself); nothing is queued or billed.
            services.audit.record(
                "policy.blocked",
                actor=f"tenant:{tenant.id}",
                tenant_id=tenant.id,
                rule_id=hit.rule_id,
                param=param,
                source=source,
                trace_id=trace.trace_id,
            )
            raise PolicyViolation(f"the request was blocked by content policy rule {hit.rule_id}", param=param)
    if webhook_url is not None and not webhook_checked:
        from zimage_platform.scheduling.webhooks import validate_webhook_url

        validate_webhook_url(webhook_url, allow_private=config.webhooks.allow_private)
    kind = "edit" if first.init_image is not None else "hires" if first.hires is not None else "text2img"
    job_params: dict[str, Any] = {
        "prompt": first.prompt,
        "negative_prompt": first.negative_prompt,
        "size": str(first.size),
        "steps": first.steps,
        "guidance": first.guidance,
        "sampler": first.sampler,
        "scheduler": first.scheduler,
        "shift": first.shift,
        "trace_context": dict(trace.carrier),
    }
    if first.png_text:
        job_params["png_text"] = dict(first.png_text)
    if input_key is not None:
        job_params.update(input_key=input_key, strength=first.strength)
    if first.hires is not None:
        job_params.update(hires_from=str(first.hires.base_size), hires_denoise=first.hires.denoise)
    return NewJob(
        id=new_id("job"),
        tenant_id=tenant.id,
        variant=variant,
        kind=kind,
        params=job_params,
        seeds=[r.seed for r in requests],
        priority_class=tenant.priority_class,
        plan=tenant.plan,
        source=source,
        idempotency_key=idempotency_key,
        request_hash=body_hash,
        webhook_url=webhook_url,
        batch_id=batch_id,
        batch_row=batch_row,
        trace_id=trace.trace_id,
        max_concurrent_jobs=tenant.limits.concurrent_jobs,
        monthly_images=tenant.limits.monthly_images,
    )


async def submit(services: PlatformServices, tenant: TenantSpec, job: NewJob) -> tuple[JobRow, bool]:
    """Images-per-minute limit, then the scheduler's admission (queue bound, concurrency, quota),
    entered through the class's submit gate. A replayed Idempotency-Key returns its job without
    spending the tenant's limits again."""
    if job.idempotency_key and (existing := await asyncio.to_thread(services.store.find_idempotent, job)):
        return existing, False
    await services.rate_limiter.acheck_images(tenant.id, tenant.limits.images_per_minute, len(job.seeds))
    async with services.submit_gates.enter(job.priority_class):
        try:
            return await services.scheduler.submit(job)
        except SchedulerUnavailable as unavailable:
            return await _written_before(services, job, unavailable), True


async def _written_before(services: PlatformServices, job: NewJob, unavailable: SchedulerUnavailable) -> JobRow:
    """The job's row if it was written before the scheduler died (then it is accepted: the
    restarted scheduler re-queues it from the job table); otherwise the 503, safe to resend."""
    try:
        return await asyncio.to_thread(services.store.get, job.id, job.tenant_id)
    except JobNotFound:
        raise unavailable from None


async def submit_and_wait(
    services: PlatformServices, tenant: TenantSpec, job: NewJob, *, inline: bool = False
) -> Submitted:
    """:func:`submit` for the synchronous APIs, in one call to the scheduler: the job comes back
    finished (no read of the job store), with its PNGs when ``inline``. A replayed
    Idempotency-Key waits for the earlier job (its PNGs are then read from S3). The class's
    submit gate is held only until the job is admitted, not while its images are made."""
    replay = job.idempotency_key and await asyncio.to_thread(services.store.find_idempotent, job)
    if not replay:
        await services.rate_limiter.acheck_images(tenant.id, tenant.limits.images_per_minute, len(job.seeds))
    wait_s = services.config.limits.sync_timeout_s
    deadline = time.monotonic() + wait_s
    async with services.submit_gates.enter(job.priority_class) as leave:
        try:
            return await services.scheduler.submit_and_wait(job, wait_s, inline=inline, on_admitted=leave)
        except SchedulerUnavailable as unavailable:
            await _written_before(services, job, unavailable)
    return await _follow_after_restart(services, job.id, deadline)


async def _follow_after_restart(services: PlatformServices, job_id: str, deadline: float) -> Submitted:
    """An accepted synchronous job whose scheduler died while the caller waited: the restarted
    scheduler re-queues it from the job table, so wait on it there (retrying while Serve brings
    the scheduler back) and answer as usual; the PNGs are then read from S3. Short waits, then a
    read of the row: the job may finish before a wait on the new scheduler begins."""
    while True:
        row = await asyncio.to_thread(services.store.get, job_id)
        remaining = deadline - time.monotonic()
        if row.status in TERMINAL or remaining <= 0:
            return Submitted(row, True, timed_out=row.status not in TERMINAL)
        try:
            await services.scheduler.wait(job_id, min(remaining, 2.0))
        except (TimeoutError, SchedulerUnavailable):
            await asyncio.sleep(min(0.5, max(0.0, deadline - time.monotonic())))


async def submit_batch(services: PlatformServices, tenant: TenantSpec, jobs: list[NewJob], batch: BatchRow) -> None:
    """A bulk batch through the same tenant admission as a job: images per minute (a file with
    more than a minute's worth spends the whole minute: it is admitted when the tenant's window
    is empty), then the scheduler's (queue bound and the tenant's share of it, one concurrency
    slot, quota), which writes the batch and its jobs in one transaction, or nothing."""
    per_minute = tenant.limits.images_per_minute
    images = sum(len(job.seeds) for job in jobs)
    await services.rate_limiter.acheck_images(tenant.id, per_minute, min(images, per_minute))
    async with services.submit_gates.enter(jobs[0].priority_class):
        await services.scheduler.submit_many(jobs, batch)


def job_view(services: PlatformServices, row: JobRow, *, presign: bool = True) -> dict[str, Any]:
    """The job as callers see it: status, per-image presigned URLs, seeds, timings, errors."""
    params = {k: v for k, v in row.params.items() if k not in _INTERNAL_PARAMS}
    images = []
    for image in row.images:
        url = (
            services.results.presign_get(image.s3_key) if presign and image.status == "done" and image.s3_key else None
        )
        images.append(
            {
                "index": image.index,
                "seed": image.seed,
                "status": image.status,
                "url": url,
                "sha256": image.sha256,
                "size_bytes": image.size_bytes,
                "batch_size": image.batch_size,
                "timings": image.timings,
                "error_code": image.error_code,
            }
        )
    return {
        "id": row.id,
        "object": "job",
        "status": row.status,
        "variant": row.variant,
        "kind": row.kind,
        "priority_class": row.priority_class,
        "n": row.n,
        "params": params,
        "images": images,
        "created_at": row.created_at,
        "started_at": row.started_at,
        "finished_at": row.finished_at,
        "attempts": row.attempts,
        "trace_id": row.trace_id,
        "batch_id": row.batch_id,
        "error": {"code": row.error_code, "message": row.error_message} if row.error_code else None,
    }


def raise_for_failed(row: JobRow) -> None:
    """Synchronous endpoints answer a failed job with the job's own reason."""
    if row.status == "failed":
        raise PlatformError(row.error_message or "generation failed", code=row.error_code or "generation_failed")
    if row.status == "cancelled":
        raise PlatformError("the request was cancelled", code=row.error_code or "cancelled")
